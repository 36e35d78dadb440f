"""Check a generated picture against the scene its prompt asks for, by pixel analysis.

The background colour is read from the border; the shape's colour from the
pixels farthest from it; the shape is where a pixel is more than half-way from
the background to that colour (the anti-aliasing contour, which blur leaves in
place); its kind is the ideal circle, square or triangle of the same area and
centroid that overlaps it most. Checked on rendered and on blurred ground truth
by the tests, so a score measures the model, not the scorer.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

import torch

from imagegenx.shapes.captions import COLOURS, POSITIONS, SHAPES, SIZES, Scene, parse
from imagegenx.shapes.render import SQUARE_HALF_SIDE, TRIANGLE_CIRCUMRADIUS, coverage

_PALETTE = np.array(list(COLOURS.values()), dtype=np.float32)
_NAMES = list(COLOURS)
MIN_PIXELS = 12  # fewer differing pixels than this: no shape was drawn
FOREGROUND_DISTANCE = 40.0  # RGB distance from the background: half the closest palette pair (orange/yellow, 81)


@dataclass(frozen=True)
class Reading:
    """What the scorer sees in a picture (None: nothing recognisable)."""

    background: str
    colour: str | None
    shape: str | None
    fill: float
    centre: tuple[float, float] | None
    radius: float | None


@dataclass(frozen=True)
class Score:
    """Per-attribute verdicts; size and position are None when the prompt leaves them open."""

    colour: bool
    background: bool
    shape: bool
    size: bool | None
    position: bool | None

    @property
    def colours(self) -> bool:
        """Both colours right: the shape's and the background's."""
        return self.colour and self.background


def nearest_colour(rgb: np.ndarray) -> str:
    return _NAMES[int(np.argmin(((_PALETTE - rgb) ** 2).sum(axis=1)))]


def read(image: Image.Image) -> Reading:
    a = np.asarray(image.convert("RGB"), dtype=np.float32)
    h, w, _ = a.shape
    border = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])
    bg_rgb = np.median(border, axis=0)
    distance = np.sqrt(((a - bg_rgb) ** 2).sum(axis=2))
    background = nearest_colour(bg_rgb)
    if (distance > FOREGROUND_DISTANCE).sum() < MIN_PIXELS:
        return Reading(background, None, None, 0.0, None, None)
    # The shape's colour: pixels well away from the background, so soft edges do not mix in.
    core = distance >= 0.75 * distance.max()
    fg_rgb = np.median(a[core], axis=0)
    colour = nearest_colour(fg_rgb)
    # Coverage of each pixel along the background->shape colour line; the shape is
    # where it passes one half, the contour an anti-aliased or slightly blurred
    # picture keeps in place whatever the contrast of the two colours.
    axis = fg_rgb - bg_rgb
    coverage = ((a - bg_rgb) @ axis) / max(float(axis @ axis), 1e-6)
    mask = (coverage > 0.5) & (distance > FOREGROUND_DISTANCE / 2)
    if mask.sum() < MIN_PIXELS:
        return Reading(background, colour, None, 0.0, None, None)
    ys, xs = np.nonzero(mask)
    x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
    fill = float(mask.sum() / ((x1 - x0) * (y1 - y0)))
    centre = (float(xs.mean() + 0.5) / w, float(ys.mean() + 0.5) / h)  # the centroid, as drawn
    area = float(mask.sum()) / (w * h)
    # The kind whose ideal outline, of the same area and centroid, overlaps the mask most.
    fits = {kind: _iou(mask, kind, centre, _radius(kind, area)) for kind in SHAPES}
    shape = max(fits, key=fits.__getitem__)
    return Reading(background, colour, shape, fill, centre, _radius(shape, area))


def _radius(kind: str, area: float) -> float:
    """The renderer's size unit (radius) of a ``kind`` covering ``area`` of the picture."""
    per_unit = {"circle": np.pi, "square": 4 * SQUARE_HALF_SIDE ** 2,
                "triangle": 0.75 * np.sqrt(3) * TRIANGLE_CIRCUMRADIUS ** 2}[kind]
    return float(np.sqrt(area / per_unit))


def _iou(mask: np.ndarray, kind: str, centre: tuple[float, float], radius: float) -> float:
    h, w = mask.shape
    cx, cy = centre
    ideal = coverage(torch.tensor([SHAPES.index(kind)]), torch.tensor([cx]), torch.tensor([cy]),
                     torch.tensor([radius]), w)[0].numpy() > 0.5
    union = (mask | ideal).sum()
    return float((mask & ideal).sum() / union) if union else 0.0


def score(image: Image.Image, scene: Scene) -> Score:
    r = read(image)
    size_ok = position_ok = None
    if scene.size is not None:
        size_ok = r.radius is not None and _nearest(r.radius, SIZES) == scene.size
    if scene.position is not None:
        position_ok = r.centre is not None and _nearest_position(r.centre) == scene.position
    return Score(r.colour == scene.colour, r.background == scene.background,
                 r.shape == scene.shape, size_ok, position_ok)


def _nearest(value: float, table: dict[str, float]) -> str:
    return min(table, key=lambda k: abs(table[k] - value))


def _nearest_position(centre: tuple[float, float]) -> str:
    return min(POSITIONS, key=lambda k: (POSITIONS[k][0] - centre[0]) ** 2 + (POSITIONS[k][1] - centre[1]) ** 2)


def accuracy(scores: Iterable[Score]) -> dict[str, float]:
    """Fraction right per attribute, over the prompts that state it."""
    scores = list(scores)
    out: dict[str, float] = {}
    for name in ("colours", "colour", "background", "shape", "size", "position"):
        values = [getattr(s, name) for s in scores]
        values = [v for v in values if v is not None]
        out[name] = sum(values) / len(values) if values else float("nan")
    out["all"] = sum(s.colours and s.shape for s in scores) / len(scores) if scores else float("nan")
    return out


def prompt_accuracy(images: Sequence[Image.Image], prompts: Sequence[str]) -> dict[str, float]:
    """``accuracy`` of pictures against their prompts, and how many were scored: the
    ``imagegenx optimize verify --scorer`` hook. Prompts outside the shapes grammar are
    left out (``scored`` says how many were not); with none inside it, a ValueError."""
    pairs = [(im, parse(p)) for im, p in zip(images, prompts, strict=True)]
    scores = [score(im, scene) for im, scene in pairs if scene is not None]
    if not scores:
        raise ValueError("no prompt is in the shapes grammar ('a red circle on a blue background')")
    return {**accuracy(scores), "scored": float(len(scores))}


__all__ = ["Reading", "Score", "accuracy", "prompt_accuracy", "read", "score"]
