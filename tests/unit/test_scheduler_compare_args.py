"""The scheduler comparison's run selection: loads and step mixes, and the target
ratios when some runs were left out."""
from __future__ import annotations

import argparse

import pytest

from bench.scheduler_compare import LOADS, MIXES, mixes_arg, ratios, table
from bench.scheduler_sim import loads_arg


def test_loads_and_mixes_parse() -> None:
    assert loads_arg("0.8") == (0.8,)
    assert loads_arg("0.5,0.8,0.95") == LOADS
    assert mixes_arg("fixed20") == ("fixed20",)
    assert mixes_arg("fixed20,mixed") == tuple(MIXES)


@pytest.mark.parametrize("text", ["", "0", "0.8,x", "2"])
def test_bad_loads_name_the_problem(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="load|numbers"):
        loads_arg(text)


def test_an_unknown_mix_lists_the_known_ones() -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="unknown mix 'steady'; choose from fixed20, mixed"):
        mixes_arg("fixed20,steady")


def _run(p50: float, p99: float, by_steps: dict[str, dict[str, float]] | None = None) -> dict:
    return {"images_per_s": 10.0, "latency_s": {"p50": p50, "p95": p99, "p99": p99},
            "latency_by_steps_s": by_steps or {}, "rows_per_call": 2.0}


def _policy(runs: dict) -> dict:
    return {"closed_loop": {"images_per_s": 14.0, "latency_s": {}, "rows_per_call": 30.0},
            "idle_single": {"latency_s": {"p50": 0.19}}, **runs}


def test_an_empty_mix_is_unknown() -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="unknown mix ''"):
        mixes_arg("")


def test_ratios_of_runs_left_out_are_none() -> None:
    report = {"loads": [0.8], "mixes": ["fixed20"],
              "request": _policy({"open_fixed20_0.8": _run(1.0, 4.0)}),
              "step": _policy({"open_fixed20_0.8": _run(0.3, 1.0)})}
    r = ratios(report)
    assert r["fixed20_0.8_p50_step_over_request"] == pytest.approx(0.3)
    assert r["fixed20_0.8_p99_step_over_request"] == pytest.approx(0.25)
    assert r["mixed_0.8_p99_step_over_request"] is None
    assert r["mixed_0.8_step_p50_10_over_50"] is None
    assert r["saturation_step_over_request"] == pytest.approx(1.0)
    report["ratios"] = r
    text = table(report)
    assert "open_fixed20_0.8 | step" in text and "open_mixed" not in text and "open_fixed20_0.5" not in text


def test_mixed_ratios_use_the_step_counts() -> None:
    mixed = {"10": {"p50": 0.5}, "50": {"p50": 2.0}}
    report = {"request": _policy({"open_mixed_0.8": _run(2.0, 8.0)}),
              "step": _policy({"open_mixed_0.8": _run(1.0, 2.0, mixed)})}
    r = ratios(report)
    assert r["mixed_0.8_p99_step_over_request"] == pytest.approx(0.25)
    assert r["mixed_0.8_step_p50_10_over_50"] == pytest.approx(0.25)


def test_the_breakdown_splits_each_requests_time_and_the_table_shows_it() -> None:
    from bench.scheduler_compare import breakdown

    def done(sent: float, finished: float, queued: float, engine: float, post: float) -> tuple:
        timings = {"queued_s": queued, "engine_s": engine, "postprocess_s": post}
        return (20, sent, finished, {"status": "SUCCESS", "result": {"timings": timings}})

    split = breakdown([done(0.0, 1.0, 0.1, 0.7, 0.05), done(1.0, 1.5, 0.0, 0.4, 0.04),
                       (20, 0.0, 1.0, {"status": "SUCCESS", "result": {}})])  # no timings: left out
    assert split["engine_s"]["p50"] == pytest.approx(0.55)
    assert split["rest_s"]["p50"] == pytest.approx((0.15 + 0.06) / 2)
    assert breakdown([]) == {}
    run = {**_run(0.8, 2.0), "breakdown_s": split}
    report = {"loads": [0.8], "mixes": ["fixed20"],
              "request": _policy({"open_fixed20_0.8": _run(1.0, 4.0)}),
              "step": _policy({"open_fixed20_0.8": run})}
    report["ratios"] = ratios(report)
    text = table(report)
    assert "  open_fixed20_0.8 step: 0.050 / 0.550 / 0.045 / 0.105" in text
    assert "open_fixed20_0.8 request:" not in text  # a run without timings shows none


def _single(policy: str, **over: object) -> dict:
    base = {"date": "2026-12-04T00:00:00Z", "machine": {}, "engine": "diffusion", "loads": [0.8],
            "mixes": ["fixed20"], "max_batch": 32, "duration_s": 300.0, "size": 512,
            "guidance_interval": [0.0, 0.4], "request_saturation_per_s": 14.0,
            "command": f"python -m bench.scheduler_compare --policies {policy}"}
    p50, p99 = (2.0, 5.0) if policy == "request" else (0.8, 2.0)
    return {**base, **over, policy: _policy({"open_fixed20_0.8": _run(p50, p99)})}


def test_policies_parse_and_bad_ones_name_the_known() -> None:
    from bench.scheduler_compare import policies_arg, positive_rate
    assert policies_arg("step") == ("step",)
    assert policies_arg("request,step") == ("request", "step")
    for bad in ("fifo", "step,step", ""):
        with pytest.raises(argparse.ArgumentTypeError, match="request, step"):
            policies_arg(bad)
    assert positive_rate("14.0") == 14.0
    for bad, reason in (("x", "images per second"), ("0", "above 0"), ("-1", "above 0")):
        with pytest.raises(argparse.ArgumentTypeError, match=reason):
            positive_rate(bad)


def test_single_policy_reports_combine_into_one_comparison() -> None:
    from bench.scheduler_compare import combine
    joined = combine([_single("request"), _single("step")])
    assert joined["ratios"]["fixed20_0.8_p50_step_over_request"] == pytest.approx(0.4)
    assert joined["ratios"]["fixed20_0.8_p99_step_over_request"] == pytest.approx(0.4)
    assert joined["commands"] == ["python -m bench.scheduler_compare --policies request",
                                  "python -m bench.scheduler_compare --policies step"]
    assert "open_fixed20_0.8 | request" in table(joined)
    # the order of the files does not matter
    assert combine([_single("step"), _single("request")])["ratios"] == joined["ratios"]


@pytest.mark.parametrize("reports, reason", [
    ([_single("request"), _single("step", request_saturation_per_s=13.0)], "request_saturation_per_s"),
    ([_single("request"), _single("step", duration_s=90.0)], "duration_s"),
    ([_single("request"), _single("request")], "two reports measure the request policy"),
    ([_single("step")], "no report measures the request policy"),
])
def test_reports_of_different_arrivals_do_not_combine(reports: list, reason: str) -> None:
    from bench.scheduler_compare import combine
    with pytest.raises(ValueError, match=reason):
        combine(reports)


def test_a_single_policy_report_has_a_table_and_no_ratios() -> None:
    report = _single("step")
    assert ratios(report) == {}
    report["ratios"] = {}
    assert "open_fixed20_0.8 | step" in table(report)


def test_the_cli_needs_a_rate_without_the_request_policy(capsys: pytest.CaptureFixture[str]) -> None:
    from bench.scheduler_compare import main
    with pytest.raises(SystemExit) as exc:
        main(["--policies", "step"])
    assert exc.value.code == 2
    assert "--saturation-rate is needed" in capsys.readouterr().err


def test_combine_from_files_reports_a_clear_error(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    import json
    from bench.scheduler_compare import main
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(_single("request")))
    b.write_text(json.dumps(_single("step", duration_s=90.0)))
    assert main(["--combine", str(a), str(b), "--out", str(tmp_path / "out")]) == 2
    assert "--combine: the reports differ in duration_s" in capsys.readouterr().err
    b.write_text(json.dumps(_single("step")))
    assert main(["--combine", str(a), str(b), "--out", str(tmp_path / "out")]) == 0
    written = json.loads((tmp_path / "out" / "scheduler_compare_diffusion.json").read_text())
    assert written["ratios"]["fixed20_0.8_p50_step_over_request"] == pytest.approx(0.4)


def test_burst_rate_counts_whole_batch_periods() -> None:
    from bench.harness import burst_rate
    # Batches of 32 every 2.0 s, each spread over 31 ms, from t=1.0: 16 images/s.
    finishes = [1.0 + 2.0 * k + 0.001 * i for k in range(9) for i in range(32)]
    # A plain count over 4.0-14.5 s holds 5 batches in 10.5 s: the batch quantum shows.
    assert sum(1 for t in finishes if 4.0 <= t <= 14.5) / 10.5 == pytest.approx(15.24, abs=0.01)
    assert burst_rate(finishes, 4.0, 14.5) == pytest.approx(16.0, rel=1e-3)
    assert burst_rate(finishes, 4.0, 16.0) == pytest.approx(16.0, rel=1e-3)


def test_burst_rate_of_steady_completions_and_too_few() -> None:
    from bench.harness import burst_rate
    steady = [0.05 * i for i in range(401)]  # 20 per second, never a pause
    assert burst_rate(steady, 1.0, 19.0) == pytest.approx(20.0)
    sparse = [0.5 * i for i in range(41)]  # every gap is a burst end
    assert burst_rate(sparse, 1.0, 19.0) == pytest.approx(2.0)
    # Too few to see bursts, or under two periods of them: the plain count over the window.
    ramp = [7.95] + [9.35 + 0.01 * i for i in range(21)] + [10.74, 10.75, 24.7]
    assert burst_rate(ramp, 0.0, 10.0) == pytest.approx(2.2)
    assert burst_rate([], 0.0, 10.0) == 0.0
    assert burst_rate([3.0], 0.0, 10.0) == pytest.approx(0.1)
    assert burst_rate([3.0, 3.0, 12.0], 0.0, 10.0) == pytest.approx(0.2)


def test_saturation_only_needs_no_rate(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the closed loop is measured, so no load needs the request policy's rate."""
    import bench.scheduler_compare as sc
    seen = {}

    def stop(args):  # the service would start here
        seen["args"] = args
        raise SystemExit(0)
    monkeypatch.setattr(sc, "resolve_service_args", stop)
    with pytest.raises(SystemExit):
        sc.main(["--policies", "step", "--saturation-only"])
    assert seen["args"].saturation_only
    assert (seen["args"].loads, seen["args"].mixes, seen["args"].duration) == ((), (), 0.0)


def test_a_rate_copied_from_the_log_combines_with_the_measured_one() -> None:
    """The request run measured 13.1921 images/s; the step run was given the 13.19 its
    log printed: the same seeded draws, scaled by 0.02%."""
    from bench.scheduler_compare import arrivals, combine
    joined = combine([_single("request", request_saturation_per_s=13.1921),
                      _single("step", request_saturation_per_s=13.19)])
    assert joined["request_saturation_per_s_given"] == [13.1921, 13.19]
    a, b = arrivals(0.8 * 13.1921, 75.0, (20,), seed=81), arrivals(0.8 * 13.19, 75.0, (20,), seed=81)
    assert len(a) == len(b) and max(abs(x - y) for (x, _), (y, _) in zip(a, b)) < 0.02
    with pytest.raises(ValueError, match="request_saturation_per_s"):
        combine([_single("request", request_saturation_per_s=13.1921),
                  _single("step", request_saturation_per_s=13.18)])


def test_a_missing_model_folder_is_refused_not_replaced_by_the_tiny_model(
        tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    from bench.scheduler_compare import main
    with pytest.raises(SystemExit) as exc:
        main(["--engine", "diffusion", "--model", str(tmp_path / "sd15"), "--out", str(tmp_path / "o")])
    assert exc.value.code == 2
    assert f"--model: no model folder at {tmp_path / 'sd15'}" in capsys.readouterr().err
