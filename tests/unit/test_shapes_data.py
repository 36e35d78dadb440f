"""The shapes data set: caption grammar, held-out split, renderer, and a scorer
that is right on rendered and on blurred ground truth (so a model's score
measures the model, not the scorer)."""
from __future__ import annotations

import random

import pytest
from PIL import Image, ImageFilter

from imagegenx.shapes.captions import (
    COLOURS,
    SHAPES,
    Scene,
    all_triplets,
    caption,
    evaluation_prompts,
    held_out_triplets,
    parse,
    random_scene,
)
from imagegenx.shapes.render import render
from imagegenx.shapes.scorer import accuracy, prompt_accuracy, read, score


def pictures(n: int, seed: int) -> tuple[list[Image.Image], list[Scene]]:
    rng = random.Random(seed)
    pairs = [random_scene(rng, all_triplets()) for _ in range(n)]
    batch = render([full for full, _ in pairs], rng)
    images = [Image.fromarray((x * 255).round().byte().permute(1, 2, 0).numpy()) for x in batch]
    return images, [stated for _, stated in pairs]


def test_captions_parse_back_to_their_scene() -> None:
    rng = random.Random(0)
    for _ in range(300):
        _, stated = random_scene(rng, all_triplets())
        assert parse(caption(stated)) == stated
    assert parse("a red circle on a blue background") == Scene("red", "circle", "blue")
    assert parse("An orange square in the center on a white background.") == Scene(
        "orange", "square", "white", None, "center")
    assert caption(Scene("orange", "square", "white")) == "an orange square on a white background"


@pytest.mark.parametrize("text", ["a red circle", "a red circle on a red background",
                                  "a red hexagon on a blue background", "two red circles on a blue background"])
def test_prompts_outside_the_grammar_are_not_scored(text: str) -> None:
    assert parse(text) is None


def test_held_out_combinations_use_only_words_seen_in_training() -> None:
    held = held_out_triplets()
    assert len(held) == 16
    training = set(all_triplets()) - held
    for i, values in enumerate((COLOURS, SHAPES, COLOURS)):
        assert {t[i] for t in training} >= (set(values) if i != 2 else set(COLOURS))
    prompts = evaluation_prompts(200)
    assert len(prompts) == 200 and all(parse(p).triplet in held for p in prompts)  # type: ignore[union-attr]
    assert not any(parse(p).triplet in held for p in evaluation_prompts(200, held_out=False))  # type: ignore[union-attr]
    assert evaluation_prompts(200) == evaluation_prompts(200)  # fixed


def test_renderer_paints_the_palette_colours() -> None:
    images, scenes = pictures(20, seed=3)
    for image, scene in zip(images, scenes):
        assert image.getpixel((0, 0)) == tuple(round(c / 255 * 255) for c in COLOURS[scene.background])
        assert read(image).colour == scene.colour


def test_scorer_is_right_on_ground_truth() -> None:
    images, scenes = pictures(400, seed=1)
    acc = accuracy(score(im, s) for im, s in zip(images, scenes))
    assert acc["colours"] == 1.0 and acc["shape"] == 1.0 and acc["position"] == 1.0
    assert acc["size"] >= 0.99  # jitter puts a few sizes near a class boundary


def test_scorer_tolerates_soft_edges() -> None:
    """Generated pictures are softer than renders: a blur must not change the verdicts much."""
    images, scenes = pictures(400, seed=2)
    blurred = [im.filter(ImageFilter.GaussianBlur(1.2)) for im in images]
    acc = accuracy(score(im, s) for im, s in zip(blurred, scenes))
    assert acc["colours"] >= 0.99 and acc["shape"] >= 0.95 and acc["position"] >= 0.99


def test_a_picture_without_a_shape_gets_no_shape() -> None:
    flat = Image.new("RGB", (64, 64), COLOURS["blue"])
    r = read(flat)
    assert r.background == "blue" and r.shape is None and r.colour is None
    s = score(flat, Scene("red", "circle", "blue"))
    assert s.background and not s.colour and not s.shape


def test_prompt_accuracy_is_the_verify_scorer_hook() -> None:
    images, scenes = pictures(12, seed=4)
    prompts = [caption(s) for s in scenes]
    wrong = Scene(scenes[0].background, scenes[0].shape, scenes[0].colour)  # colours swapped
    acc = prompt_accuracy([*images, images[0], images[1]], [*prompts, caption(wrong), "a photo of a cat"])
    assert acc["colour"] == acc["background"] == acc["colours"] == 12 / 13  # the cat is left out
    assert acc["scored"] == 13
    assert acc["shape"] == 1.0
    with pytest.raises(ValueError, match="shapes grammar"):
        prompt_accuracy(images[:1], ["a photo of a cat"])
    with pytest.raises(ValueError):
        prompt_accuracy(images[:2], prompts[:1])  # one prompt per image
