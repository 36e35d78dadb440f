"""Preview rules, map and PNG (pure), and the request field's validation."""
from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from imagegenx.preview import MIN_SIDE, PreviewMap, encode, preview_due
from imagegenx.schemas import MAX_PREVIEW_EVERY, GenerateRequest, error_reason


def test_a_preview_is_due_once_a_multiple_of_every_is_passed() -> None:
    # every 3, previews taken at each due step: 3, 6, 9
    last, taken = 0, []
    for index in range(1, 11):
        if preview_due(index, 3, last):
            taken.append(index)
            last = index
    assert taken == [3, 6, 9]


def test_a_due_preview_held_back_by_the_interval_is_taken_later_not_lost() -> None:
    # every 2; progress stored only at steps 1, 5, 9 (the interval rule): previews at 5 and 9
    last, taken = 0, []
    for index in (1, 5, 9):
        if preview_due(index, 2, last):
            taken.append(index)
            last = index
    assert taken == [5, 9]


def test_map_projection_and_json_round_trip(tmp_path) -> None:
    m = PreviewMap(((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0), (0.0, 0.0, 0.0)), (0.0, 0.0, 0.5))
    latents = np.zeros((2, 4, 3, 5), np.float32)
    latents[0, 0] = 1.0
    rgb = m.project(latents)
    assert rgb.shape == (2, 3, 5, 3) and rgb.dtype == np.uint8
    assert tuple(rgb[0, 0, 0]) == (255, 0, 128) and tuple(rgb[1, 0, 0]) == (0, 0, 128)
    m.save(tmp_path / "preview.json")
    assert PreviewMap.load(tmp_path / "preview.json") == m
    with pytest.raises(ValueError):
        PreviewMap.from_json({"weights": [[1.0, 2.0]], "bias": [0, 0, 0]})


def test_encode_puts_a_request_s_images_side_by_side_as_a_small_png() -> None:
    images = np.zeros((2, 16, 16, 3), np.uint8)
    images[1] = 255
    p = encode(images, 6)
    assert p["step"] == 6
    assert (p["width"], p["height"]) == (2 * MIN_SIDE, MIN_SIDE)
    png = Image.open(io.BytesIO(base64.b64decode(p["png_base64"])))
    assert png.size == (p["width"], p["height"]) and png.mode == "RGB"
    pixels = np.asarray(png)
    assert pixels[:, :MIN_SIDE].max() == 0 and pixels[:, MIN_SIDE:].min() == 255


@pytest.mark.parametrize("value,reason", [
    ({"every": 0}, "must be at least 1"),
    ({"every": MAX_PREVIEW_EVERY + 1}, f"must be at most {MAX_PREVIEW_EVERY}"),
    ({"every": "2"}, "must be a number, not a string"),
    ({"every": 2, "size": 3}, "Extra inputs are not permitted"),
    ({}, "Field required"),
])
def test_a_bad_preview_field_is_refused_naming_it(value, reason: str) -> None:
    with pytest.raises(ValidationError) as info:
        GenerateRequest.model_validate({"prompt": "x", "preview": value})
    (err,) = info.value.errors()
    assert err["loc"][0] == "preview"
    assert reason in error_reason(err)


def test_preview_is_optional() -> None:
    assert GenerateRequest.model_validate({"prompt": "x"}).preview is None
    assert GenerateRequest.model_validate({"prompt": "x", "preview": {"every": 5}}).preview.every == 5
