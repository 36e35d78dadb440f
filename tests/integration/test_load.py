"""Short run of the load test (bench/load_test.py): twice the worker's capacity
for 5 s against the real processes (gunicorn API, celery worker with the
synthetic sd15-h200 cost model, Redis). Nothing accepted may be lost, overload
must be refused with 503 + Retry-After (never another error), and the queue
must drain. The full 60 s run's figures are in docs/benchmarks/load_test.json.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from bench.load_test import cost_model_capacity, main

pytestmark = pytest.mark.integration


def test_twice_the_capacity_for_five_seconds_loses_nothing(redis_base: str, tmp_path: Path) -> None:
    import json

    out = tmp_path / "load.json"
    capacity = cost_model_capacity(8)
    main(["--redis", f"{redis_base}/3", "--duration", "5", "--capacity", f"{capacity:.3f}",
          "--max-queue-depth", "20", "--drain-timeout", "60", "--out", str(out), "--copy-to", ""])
    report = json.loads(out.read_text())
    s, checks = report["summary"], report["checks"]
    assert s["requests"] >= 80  # 2 x ~9 requests/s for 5 s
    assert s["accepted"] > 0 and s["lost"] == 0 and s["result_states"] == {"SUCCESS": s["accepted"]}
    assert s["other_status"] == 0  # every answer was 202 or 503
    assert s["refused_503"] > 0 and s["refused_with_retry_after"]  # the depth limit engaged
    assert s["max_queue_depth_seen"] <= 20 + 16  # limit + at most one submission per API thread
    assert checks["queue_grew"] and checks["queue_drained"] and checks["zero_lost"]
