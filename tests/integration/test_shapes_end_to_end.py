"""The shipped shapes model through the whole queue path: the pictures that come back
over HTTP show the colours and the shape the prompt asks for, alone and batched.

Prompts mix seen and held-out colour/shape/background combinations (training never
showed the held-out ones); the scorer reads each PNG as served by the API.
"""
from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from PIL import Image

from imagegenx.shapes.captions import held_out_triplets, parse
from imagegenx.shapes.model_files import SHAPES_MODEL
from imagegenx.shapes.scorer import read, score
from tests.integration.stack import API_KEY, Stack, running_stack, served_rgb
from tests.service import wait_task

pytestmark = pytest.mark.integration

BATCHED = [
    "a red circle on a blue background",
    "a small yellow triangle at the top on a black background",  # held out
    "a large green square on a white background",
    "an orange circle at the left on a red background",  # held out
    "a purple triangle on a yellow background",
    "a white square at the bottom right on a green background",
]


@pytest.fixture(scope="module")
def stack(redis_base: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with running_stack(redis_base, tmp_path_factory.mktemp("shapes-e2e"), SHAPES_MODEL, name="shapes",
                       IMAGEGENX_MAX_WAIT_MS="500") as s:
        yield s


def assert_draws(prompt: str, image: Image.Image) -> None:
    scene = parse(prompt)
    assert scene is not None
    verdict = score(image, scene)
    assert verdict.colours and verdict.shape, (prompt, read(image))


def test_the_prompts_mix_seen_and_held_out_combinations() -> None:
    held = held_out_triplets()
    kinds = [parse(p).triplet in held for p in BATCHED]  # type: ignore[union-attr]
    assert any(kinds) and not all(kinds)


def test_one_request_alone_gets_its_colours_and_shape(stack: Stack) -> None:
    prompt = "a blue square on a white background"  # held out
    done = wait_task(stack.base, stack.submit({"prompt": prompt, "seed": 7}), API_KEY, 60)
    assert done["state"] == "SUCCESS", done
    assert done["result"]["batch"]["size"] == 1
    (image,) = done["result"]["images"]
    assert (image["width"], image["height"]) == (64, 64)
    assert_draws(prompt, served_rgb(image["url"]))
    assert done["result"]["warnings"] == []


def test_a_prompt_the_model_cannot_draw_gets_a_warning_naming_the_words(stack: Stack) -> None:
    done = wait_task(stack.base, stack.submit({"prompt": "a cat riding a bicycle in Paris", "seed": 1}),
                     API_KEY, 60)
    assert done["state"] == "SUCCESS", done
    assert done["result"]["warnings"] == [
        "the shapes model never saw the words 'cat', 'riding', 'bicycle', 'paris': it draws one "
        "coloured circle, square or triangle on a coloured background and leaves them out (docs/SHAPES.md)"]


def test_concurrent_requests_are_batched_and_each_gets_its_own_picture(stack: Stack) -> None:
    bodies = [{"prompt": p, "seed": 100 + i, "num_images": 2 if i == 0 else 1} for i, p in enumerate(BATCHED)]
    with ThreadPoolExecutor(len(bodies)) as pool:
        ids = list(pool.map(stack.submit, bodies))
        results = list(pool.map(lambda t: wait_task(stack.base, t, API_KEY, 120), ids))
    assert [r["state"] for r in results] == ["SUCCESS"] * len(bodies), results
    assert max(r["result"]["batch"]["requests"] for r in results) >= 2
    for body, res in zip(bodies, results):
        images = res["result"]["images"]
        assert len(images) == body["num_images"]
        for image in images:
            assert_draws(body["prompt"], served_rgb(image["url"]))
