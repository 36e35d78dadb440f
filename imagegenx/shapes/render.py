"""Draw scenes as anti-aliased pictures, batched in torch (CPU or GPU).

Training draws millions of pictures, so rendering is a few tensor ops on the
training device rather than a Python loop over Pillow images.
"""
from __future__ import annotations

import math
import random
from collections.abc import Sequence

import torch

from imagegenx.shapes.captions import COLOURS, POSITIONS, SHAPES, SIZES, Scene

PALETTE = torch.tensor(list(COLOURS.values()), dtype=torch.float32) / 255.0
COLOUR_INDEX = {name: i for i, name in enumerate(COLOURS)}
SHAPE_INDEX = {name: i for i, name in enumerate(SHAPES)}
SQUARE_HALF_SIDE = math.sqrt(math.pi) / 2  # x radius: a square of the circle's area
TRIANGLE_CIRCUMRADIUS = 1.3  # x radius: equilateral, pointing up
POSITION_JITTER = 0.04
SIZE_JITTER = 0.1
SUPERSAMPLE = 4


def coverage(shape: torch.Tensor, cx: torch.Tensor, cy: torch.Tensor, r: torch.Tensor,
             size: int) -> torch.Tensor:
    """Fraction of each pixel inside the shape: (N, size, size) in [0, 1].

    ``shape`` holds indices into SHAPES; centres and radii are fractions of the side.
    """
    n = shape.shape[0]
    dev = cx.device
    s = size * SUPERSAMPLE
    grid = (torch.arange(s, device=dev, dtype=torch.float32) + 0.5) / s
    x = grid.view(1, 1, s) - cx.view(n, 1, 1)
    y = grid.view(1, s, 1) - cy.view(n, 1, 1)
    rr = r.view(n, 1, 1)
    circle = x * x + y * y <= rr * rr
    half = rr * SQUARE_HALF_SIDE
    square = (x.abs() <= half) & (y.abs() <= half)
    big = rr * TRIANGLE_CIRCUMRADIUS  # vertices (0, -R), (+-R sqrt(3)/2, R/2); y grows downwards
    root3 = math.sqrt(3.0)
    triangle = (y <= big / 2) & (root3 * x - y <= big) & (-root3 * x - y <= big)
    k = shape.view(n, 1, 1)
    inside = torch.where(k == 0, circle, torch.where(k == 1, square, triangle)).float()
    return torch.nn.functional.avg_pool2d(inside.unsqueeze(1), SUPERSAMPLE).squeeze(1)


def render_indices(colour: torch.Tensor, shape: torch.Tensor, background: torch.Tensor,
                   cx: torch.Tensor, cy: torch.Tensor, r: torch.Tensor, size: int = 64) -> torch.Tensor:
    """Pictures as float (N, 3, size, size) in [0, 1] from attribute tensors."""
    palette = PALETTE.to(cx.device)
    alpha = coverage(shape, cx, cy, r, size).unsqueeze(1)
    fg = palette[colour].view(-1, 3, 1, 1)
    bg = palette[background].view(-1, 3, 1, 1)
    return bg * (1 - alpha) + fg * alpha


def placement(scene: Scene, rng: random.Random) -> tuple[float, float, float]:
    """(cx, cy, r) of a fully specified scene, with a little jitter, inside the picture."""
    assert scene.size is not None and scene.position is not None
    r = SIZES[scene.size] * (1 + rng.uniform(-SIZE_JITTER, SIZE_JITTER))
    px, py = POSITIONS[scene.position]
    reach = r * TRIANGLE_CIRCUMRADIUS if scene.shape == "triangle" else r
    lo, hi = reach + 0.02, 1 - reach - 0.02
    cx = min(hi, max(lo, px + rng.uniform(-POSITION_JITTER, POSITION_JITTER)))
    cy = min(hi, max(lo, py + rng.uniform(-POSITION_JITTER, POSITION_JITTER)))
    return cx, cy, r


def render(scenes: Sequence[Scene], rng: random.Random, size: int = 64,
           device: str | torch.device = "cpu") -> torch.Tensor:
    """Pictures of fully specified scenes: float (N, 3, size, size) in [0, 1]."""
    places = [placement(s, rng) for s in scenes]
    t = lambda values, dtype=torch.float32: torch.tensor(values, dtype=dtype, device=device)  # noqa: E731
    return render_indices(
        t([COLOUR_INDEX[s.colour] for s in scenes], torch.long),
        t([SHAPE_INDEX[s.shape] for s in scenes], torch.long),
        t([COLOUR_INDEX[s.background] for s in scenes], torch.long),
        t([p[0] for p in places]), t([p[1] for p in places]), t([p[2] for p in places]),
        size,
    )
