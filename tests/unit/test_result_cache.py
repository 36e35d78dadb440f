"""The result cache's fingerprint and reuse rules (pure)."""
from __future__ import annotations

from typing import Any

import pytest

from imagegenx.api.result_cache import fingerprint, image_keys, reusable, wants_cache
from imagegenx.schemas import GenerateRequest

BASE: dict[str, Any] = {"prompt": "a red circle", "seed": 7, "width": 64, "height": 64}


def fp(body: dict[str, Any], model: str = "shapes") -> str:
    return fingerprint(GenerateRequest.model_validate(body), model)


def test_field_order_and_spelled_out_defaults_do_not_change_it() -> None:
    reordered = dict(reversed(list(BASE.items())))
    defaults = {**BASE, "steps": 20, "guidance_scale": 7.5, "sampler": "euler", "negative_prompt": "",
                "num_images": 1, "postprocess": {"thumbnail": 128, "upscale": 1}, "lora": None}
    assert fp(BASE) == fp(reordered) == fp(defaults) == fp({**BASE, "prompt": "  a red circle "})


def test_fields_that_do_not_change_pixels_do_not_change_it() -> None:
    others = {"priority": 5, "callback_url": "https://example.com/hook", "timeout_s": 30,
              "preview": {"every": 2}, "cache": False}
    assert fp({**BASE, **others}) == fp(BASE)


def test_equal_lora_sets_hash_alike() -> None:
    a = {**BASE, "lora": ["b", "a"], "lora_weight": [0.5, 1.0]}
    b = {**BASE, "lora": ["a", "b"], "lora_weight": [1.0, 0.5]}
    zero = {**BASE, "lora": "a", "lora_weight": 0}
    assert fp(a) == fp(b)
    assert fp(zero) == fp(BASE)


@pytest.mark.parametrize("change", [
    {"prompt": "a blue circle"}, {"negative_prompt": "blur"}, {"width": 128}, {"height": 72},
    {"steps": 21}, {"sampler": "ddim"}, {"guidance_scale": 7.0}, {"seed": 8}, {"num_images": 2},
    {"lora": "a"}, {"lora": "a", "lora_weight": 0.5},
    {"postprocess": {"thumbnail": 64}}, {"postprocess": {"upscale": 2}},
    {"postprocess": {"watermark": {"text": "x"}}},
])
def test_any_pixel_change_changes_it(change: dict[str, Any]) -> None:
    assert fp({**BASE, **change}) != fp(BASE)


def test_the_model_changes_it() -> None:
    assert fp(BASE, "shapes") != fp(BASE, "sd15")


def test_only_a_seeded_request_with_cache_on_is_looked_up() -> None:
    req = GenerateRequest.model_validate
    assert wants_cache(req(BASE), True)
    assert not wants_cache(req(BASE), False)
    assert wants_cache(req({**BASE, "cache": True}), False)
    assert not wants_cache(req({**BASE, "cache": False}), True)
    assert not wants_cache(req({"prompt": "a red circle"}), True)
    # A webhook does not stop a hit: the API queues the completed delivery itself.
    assert wants_cache(req({**BASE, "callback_url": "https://example.com/h"}), True)


def test_webhook_fields_do_not_change_the_fingerprint() -> None:
    req = GenerateRequest.model_validate
    plain = fingerprint(req(BASE), "m")
    assert fingerprint(req({**BASE, "callback_url": "https://example.com/h",
                            "callback_events": ["started", "completed"]}), "m") == plain


def test_cache_must_be_a_boolean() -> None:
    from pydantic import ValidationError
    with pytest.raises(ValidationError):
        GenerateRequest.model_validate({**BASE, "cache": "yes"})


RESULT = {"model": "shapes", "images": [{"url": "u"}, {"url": "v"}], "steps": 20}


def test_reusable_needs_success_same_model_and_every_file() -> None:
    keys = set(image_keys("t1", RESULT))
    assert keys == {"t1/0.png", "t1/0.thumb.png", "t1/1.png", "t1/1.thumb.png"}
    meta = {"status": "SUCCESS", "result": RESULT}
    assert reusable("t1", meta, "shapes", keys.__contains__) == {**RESULT, "cached": True}
    assert reusable("t1", meta, "other", keys.__contains__) is None
    assert reusable("t1", {"status": "PROGRESS", "result": {"step": 1}}, "shapes", keys.__contains__) is None
    assert reusable("t1", meta, "shapes", (keys - {"t1/1.thumb.png"}).__contains__) is None
