"""The simulated-clock comparison prices each step by its UNet rows (guidance intervals)."""
from __future__ import annotations

import pytest

from bench.scheduler_sim import COST, batch_s, main, policies, poisson, run_request_policy, run_step_policy


def test_full_guidance_prices_every_step_at_two_rows_per_image() -> None:
    for n in (1, 3, 32):
        assert batch_s(COST, n, 20, (0.0, 1.0)) == pytest.approx(20 * COST.step_s(n) + COST.decode_s(n))


def test_an_interval_prices_its_unguided_steps_at_one_row_per_image() -> None:
    # [0, 0.4] of 20 steps: the first 8 guided (2 rows per image), the other 12 one row.
    want = 8 * COST.rows_s(2 * 4) + 12 * COST.rows_s(4) + COST.decode_s(4)
    assert batch_s(COST, 4, 20, (0.0, 0.4)) == pytest.approx(want)
    assert batch_s(COST, 4, 20, (0.0, 0.4)) < batch_s(COST, 4, 20, (0.0, 1.0))


@pytest.mark.parametrize("interval", [(0.0, 1.0), (0.0, 0.4), (0.1, 0.6)])
def test_both_policies_finish_every_request(interval: tuple[float, float]) -> None:
    reqs = poisson(8.0, 200, (10, 20, 50), seed=1, interval=interval)
    run_request_policy(reqs, COST, 8, 0.05)
    assert all(r.finished > r.arrived for r in reqs)
    reqs = poisson(8.0, 200, (10, 20, 50), seed=1, interval=interval)
    calls = run_step_policy(reqs, COST, policies(8, 0.05)["step (arrival order, cost-aware rows)"])
    rows = [unet_rows for _, unet_rows in calls]
    assert all(r.finished > r.arrived and r.remaining == 0 for r in reqs)
    assert 8 < max(rows) <= 2 * 8  # the set fills up, and never beyond the limit


def test_a_bad_interval_names_the_option(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--guidance-interval", "0.5,0.2"])
    assert exit_.value.code == 2
    assert "--guidance-interval" in capsys.readouterr().err
