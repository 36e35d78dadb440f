"""Scenes of one coloured shape on a coloured background, and their captions.

A scene is five attributes; a caption names the colour, the shape and the
background always, and the size and position only sometimes ("a red circle on a
blue background" is a valid prompt). Captions are parsed back into attributes so
the scorer can check any prompt of this grammar, not only generated ones.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass
from itertools import product

# Palette the renderer paints with and the scorer classifies into.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 30),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "orange": (245, 140, 20),
    "purple": (140, 40, 180),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
# Radius of the shape as a fraction of the image side.
SIZES: dict[str, float] = {"small": 0.11, "medium": 0.17, "large": 0.22}
# Centre of the shape as (x, y) fractions of the image side; "" is the centre.
POSITIONS: dict[str, tuple[float, float]] = {
    "top left": (0.27, 0.27), "top": (0.5, 0.27), "top right": (0.73, 0.27),
    "left": (0.27, 0.5), "center": (0.5, 0.5), "right": (0.73, 0.5),
    "bottom left": (0.27, 0.73), "bottom": (0.5, 0.73), "bottom right": (0.73, 0.73),
}

Triplet = tuple[str, str, str]  # (colour, shape, background)


@dataclass(frozen=True)
class Scene:
    """What a picture shows; ``size`` / ``position`` are None when a caption leaves them open."""

    colour: str
    shape: str
    background: str
    size: str | None = None
    position: str | None = None

    @property
    def triplet(self) -> Triplet:
        return (self.colour, self.shape, self.background)


def caption(scene: Scene) -> str:
    """The caption of a scene, e.g. 'a small red circle at the top left on a blue background'."""
    words = ["a"]
    if scene.size:
        words.append(scene.size)
    words += [scene.colour, scene.shape]
    if scene.position:
        words.append("in the center" if scene.position == "center" else f"at the {scene.position}")
    words += ["on", _article(scene.background), scene.background, "background"]
    words[0] = _article(words[1])
    return " ".join(words)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


_COLOUR = "|".join(COLOURS)
_CAPTION = re.compile(
    rf"^an? (?:(?P<size>{'|'.join(SIZES)}) )?(?P<colour>{_COLOUR}) (?P<shape>{'|'.join(SHAPES)})"
    rf"(?: (?:at the (?P<pos>{'|'.join(sorted(POSITIONS, key=len, reverse=True))})|in the (?P<centre>center)))?"
    rf" on an? (?P<bg>{_COLOUR}) background$"
)


def parse(text: str) -> Scene | None:
    """The scene a caption asks for, or None if it is not of this grammar."""
    m = _CAPTION.match(" ".join(text.lower().strip().rstrip(".").split()))
    if m is None or m["colour"] == m["bg"]:
        return None
    return Scene(m["colour"], m["shape"], m["bg"], m["size"], m["pos"] or m["centre"])


def all_triplets() -> list[Triplet]:
    return [(c, s, b) for c, s, b in product(COLOURS, SHAPES, COLOURS) if c != b]


def held_out_triplets(count: int = 16, seed: int = 7) -> frozenset[Triplet]:
    """Colour/shape/background combinations never shown in training.

    Chosen so every colour, shape and background still occurs in training:
    held-out prompts test new *combinations* of known words.
    """
    rng = random.Random(seed)
    triplets = all_triplets()
    rng.shuffle(triplets)
    held: list[Triplet] = []
    for t in triplets:
        if len(held) == count:
            break
        rest = [x for x in all_triplets() if x not in held and x != t]
        if all(any(x[i] == t[i] for x in rest) for i in range(3)):
            held.append(t)
    return frozenset(held)


def random_scene(rng: random.Random, triplets: list[Triplet], p_size: float = 0.6,
                 p_position: float = 0.6) -> tuple[Scene, Scene]:
    """(full scene to draw, scene as the caption states it) for one sample.

    The drawn scene always has a size and a position; the caption drops each
    with probability 1 - p, so unstated attributes are drawn at random.
    """
    colour, shape, background = rng.choice(triplets)
    size = rng.choice(list(SIZES))
    position = rng.choice(list(POSITIONS))
    stated = Scene(colour, shape, background,
                   size if rng.random() < p_size else None,
                   position if rng.random() < p_position else None)
    return Scene(colour, shape, background, size, position), stated


def evaluation_prompts(count: int = 200, held_out: bool = True, seed: int = 1234) -> list[str]:
    """Fixed prompts for the quality benchmark: held-out or training combinations."""
    held = held_out_triplets()
    pool = sorted(held) if held_out else sorted(set(all_triplets()) - held)
    rng = random.Random(seed)
    return [caption(random_scene(rng, pool)[1]) for _ in range(count)]
