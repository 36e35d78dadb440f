"""The cost model of a request, and the arithmetic of per-key cost budgets.

Pure: no Redis, no Flask. The API charges budgets with it, the worker writes
it into results, so both sides count the same units.

One cost unit is one UNet row of one 512x512 image (a 64x64x4 latent) for
one denoising step. UNet time grows with the latent's pixels, the images and
the UNet rows each image runs over its steps: two per step inside its
guidance interval (the conditional and the unconditional row), one outside it
or at a guidance_scale of at most 1 (``imagegenx.guidance``). A request costs

    ceil(width * height / 512**2 * num_images * rows)

units, at least 1, with rows = steps + guided steps. A 512x512 image at 20
steps costs 40 units with guidance on every step, 28 with guidance_interval
[0, 0.4], 20 at guidance_scale 1; 1024x1024, 4 images at 100 guided steps
cost 3200.
"""
from __future__ import annotations

import math

from imagegenx.guidance import trajectory_rows
from imagegenx.schemas import GenerateRequest

UNIT_SIDE = 512
# UNet rows per image and guided step: the conditional and the unconditional row
# share one batched call. A step outside the guidance interval runs one.
UNET_ROWS = 2
# The budget's moving window.
BUDGET_WINDOW_S = 60


def cost_units(width: int, height: int, steps: int, num_images: int, rows: int = UNET_ROWS,
               image_rows: int | None = None) -> int:
    """Cost units of ``num_images`` images of ``width`` x ``height`` px at ``steps`` steps
    of ``rows`` UNet rows each, or of ``image_rows`` UNet rows per image in all."""
    total = steps * rows if image_rows is None else image_rows
    numerator = width * height * num_images * total
    return max(1, -(-numerator // (UNIT_SIDE * UNIT_SIDE)))


def image_rows(request: GenerateRequest) -> int:
    """UNet rows one image of ``request`` runs over its trajectory."""
    return trajectory_rows(request.guidance_scale, request.resolved_interval(), request.steps)


def request_cost(request: GenerateRequest, unset_side: int | None = None) -> int:
    """Cost units of ``request``; an unset width or height counts as ``unset_side`` px.

    The API does not know the served model's native size, so it charges an unset
    side as the configured ``cost_native_size`` (or ``max_size``). The worker
    passes requests whose size is already resolved to the native one.
    """
    width, height = request.width or unset_side, request.height or unset_side
    if width is None or height is None:
        raise ValueError("the request's size is unset and no unset_side was given")
    return cost_units(width, height, request.steps, request.num_images, image_rows=image_rows(request))


def cost_drivers(request: GenerateRequest, unset_side: int) -> str:
    """The fields that make up the cost and their values, so a client can lower them."""
    width, height = request.width or unset_side, request.height or unset_side
    unset = (f" (an unset width or height counts as {unset_side})"
             if request.width is None or request.height is None else "")
    rows = image_rows(request) / request.steps
    return (f"width x height / {UNIT_SIDE}x{UNIT_SIDE} x steps x num_images x UNet rows per step "
            f"(2 inside guidance_interval with guidance_scale > 1, else 1): "
            f"{width}x{height} / {UNIT_SIDE}x{UNIT_SIDE} x {request.steps} x {request.num_images} "
            f"x {rows:g}{unset}")


def seconds_until_free(entry_at: float | None, now: float, window_s: float = BUDGET_WINDOW_S) -> int:
    """Whole seconds until a refused charge fits the budget (at least 1).

    ``entry_at`` is the time of the budget entry whose expiry makes room for the
    charge (the moving window's entry at index budget - cost, newest first);
    None when it has already gone (the window moved between the refusal and
    this reading).
    """
    if entry_at is None:
        return 1
    # The window still holds an entry exactly window_s old: one second past it.
    return max(1, math.floor(entry_at + window_s - now) + 1)
