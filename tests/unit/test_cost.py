"""The cost model (imagegenx.cost): units, rounding, unset sizes, budget waits."""
from __future__ import annotations

import pytest

from imagegenx.cost import UNET_ROWS, cost_drivers, cost_units, request_cost, seconds_until_free
from imagegenx.schemas import GenerateRequest
from imagegenx.settings import Settings


def req(**kw: object) -> GenerateRequest:
    return GenerateRequest.model_validate({"prompt": "x", **kw})


def test_one_512_image_step_costs_one_unit_per_unet_row() -> None:
    assert UNET_ROWS == 2  # the engine always evaluates the unconditional row too
    assert cost_units(512, 512, 1, 1) == 2
    assert cost_units(512, 512, 20, 1) == 40


def test_cost_grows_with_pixels_steps_and_images() -> None:
    base = cost_units(512, 512, 10, 1)
    assert cost_units(1024, 1024, 10, 1) == 4 * base
    assert cost_units(512, 512, 30, 1) == 3 * base
    assert cost_units(512, 512, 10, 4) == 4 * base
    assert cost_units(1024, 512, 10, 1) == 2 * base
    # The largest request the default limits allow.
    assert cost_units(1024, 1024, 100, 4) == 3200


def test_fractions_round_up_and_nothing_is_free() -> None:
    assert cost_units(64, 64, 1, 1) == 1  # 2/64 of a unit
    assert cost_units(64, 64, 32, 1) == 1  # exactly one unit
    assert cost_units(64, 64, 33, 1) == 2
    assert cost_units(520, 512, 1, 1) == 3  # 2.03 units


def test_cost_follows_the_guided_rows() -> None:
    # Two UNet rows per guided step, one outside the interval or at a scale <= 1.
    assert request_cost(req(width=512, height=512, guidance_scale=12.0)) == 40
    assert request_cost(req(width=512, height=512, guidance_scale=1.0)) == 20
    assert request_cost(req(width=512, height=512, guidance_scale=0.0)) == 20
    assert request_cost(req(width=512, height=512, guidance_interval=[0, 0.4])) == 28
    assert request_cost(req(width=512, height=512, guidance_interval=[0.1, 0.6])) == 30
    assert request_cost(req(width=512, height=512, steps=10, num_images=2,
                            guidance_interval=[0, 0.5])) == 30
    text = cost_drivers(req(width=512, height=512, guidance_interval=[0, 0.4]), unset_side=512)
    assert "512x512 / 512x512 x 20 x 1 x 1.4" in text


def test_unset_size_counts_as_the_given_side() -> None:
    assert request_cost(req(), unset_side=512) == 40
    assert request_cost(req(), unset_side=1024) == 160
    assert request_cost(req(width=256), unset_side=1024) == 40  # 256x1024
    assert request_cost(req(width=512, height=512), unset_side=1024) == 40
    with pytest.raises(ValueError, match="unset"):
        request_cost(req())


def test_settings_pick_the_unset_side() -> None:
    assert Settings().cost_unset_side == Settings().max_size == 1024
    assert Settings(cost_native_size=512).cost_unset_side == 512
    assert Settings(max_size=768).cost_unset_side == 768


def test_max_request_cost_above_the_budget_is_refused() -> None:
    with pytest.raises(ValueError, match="max_request_cost must not exceed cost_budget_per_minute"):
        Settings(max_request_cost=2000, cost_budget_per_minute=1000)
    assert Settings(max_request_cost=2000, cost_budget_per_minute=0).max_request_cost == 2000
    assert Settings(max_request_cost=0, cost_budget_per_minute=100).cost_budget_per_minute == 100


def test_defaults_bound_the_largest_request() -> None:
    s = Settings()
    largest = cost_units(s.max_size, s.max_size, s.max_steps, s.max_num_images)
    assert 0 < s.max_request_cost < largest
    # A key sending default requests (unset size) at the default rate limit fits its budget.
    assert s.cost_budget_per_minute == 60 * request_cost(req(), s.cost_unset_side)


def test_drivers_name_every_field_and_value() -> None:
    text = cost_drivers(req(steps=50, num_images=3, width=768), unset_side=1024)
    assert "steps x num_images" in text
    assert "768x1024 / 512x512 x 50 x 3 x 2" in text
    assert "unset width or height counts as 1024" in text
    assert "unset" not in cost_drivers(req(width=512, height=512), unset_side=1024)


def test_wait_until_the_blocking_entry_leaves_the_window() -> None:
    # At exactly entry + window the entry still counts: the wait ends a second later.
    assert seconds_until_free(100.0, now=130.0, window_s=60) == 31
    assert seconds_until_free(100.0, now=130.5, window_s=60) == 30  # 29.5, rounded up
    assert seconds_until_free(100.0, now=170.0, window_s=60) == 1  # already free: at least 1
    assert seconds_until_free(None, now=130.0) == 1
