"""Guidance intervals: on which denoising steps a row runs classifier-free guidance.

Classifier-free guidance costs a second (unconditional) UNet row per image and
step. It matters mostly in part of the trajectory ("Applying Guidance in a
Limited Interval Improves Sample and Distribution Quality", arXiv 2404.07724;
diffusers' ``SDCFGCutoffCallback``), so a request names an interval
``(start, end)`` of fractions of its trajectory: step ``i`` of ``n`` is guided
when ``start <= i / n < end`` and the guidance scale is above 1. Other steps run
the conditional row only. A scale of at most 1 never runs the unconditional row.

Pure arithmetic shared by the engines, the step scheduler's row accounting,
the cost model and the benchmarks, so this module imports no torch.
"""
from __future__ import annotations

Interval = tuple[float, float]

FULL: Interval = (0.0, 1.0)


def check_interval(interval: Interval) -> Interval:
    """``interval`` as two floats; ValueError says what is wrong with it."""
    if len(interval) != 2:
        raise ValueError("must be two numbers [start, end]")
    start, end = float(interval[0]), float(interval[1])
    if not 0.0 <= start < end <= 1.0:
        raise ValueError(f"must satisfy 0 <= start < end <= 1, got [{start:g}, {end:g}]")
    return (start, end)


def parse_interval(text: str) -> Interval:
    """``"start,end"`` (a setting or a CLI option) as an interval."""
    parts = [p for p in text.replace(" ", "").strip("[]()").split(",") if p]
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        raise ValueError(f"must be two numbers start,end, got {text!r}") from None
    if len(values) != 2:
        raise ValueError(f"must be two numbers start,end, got {text!r}")
    return check_interval(values)  # type: ignore[arg-type]


def guided(scale: float, interval: Interval, index: int, steps: int) -> bool:
    """Whether step ``index`` (0-based) of ``steps`` runs the unconditional row."""
    if scale <= 1.0:
        return False
    position = index / steps
    return interval[0] <= position < interval[1]


def rows_at(scale: float, interval: Interval, index: int, steps: int) -> int:
    """UNet rows of one image at step ``index``: 2 when guided, else 1."""
    return 2 if guided(scale, interval, index, steps) else 1


def guided_steps(scale: float, interval: Interval, steps: int) -> int:
    """How many of ``steps`` steps are guided."""
    return sum(guided(scale, interval, i, steps) for i in range(steps))


def trajectory_rows(scale: float, interval: Interval, steps: int) -> int:
    """UNet rows of one image over its whole trajectory (2 * steps with full guidance)."""
    return steps + guided_steps(scale, interval, steps)


def reserved_rows(scale: float, interval: Interval, index: int, steps: int) -> int:
    """The most UNet rows one image needs at any of its steps from ``index`` on.

    The step scheduler counts a running image at this, so a row whose guidance
    starts later never makes the running set outgrow its row limit; it never
    rises as the image advances.
    """
    return max((rows_at(scale, interval, i, steps) for i in range(index, steps)), default=1)
