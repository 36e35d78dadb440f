"""Redis stopped and restarted under load.

While Redis is down the API answers 503 with a JSON reason within a second (no
hang). The worker finishes its running batch, stores the results once Redis is
back, drops the requests buffered on the lost connection (their acks would go
to a dead channel) and, once reconnected, puts their messages back in the
queue at once instead of after the visibility timeout. Every accepted request
completes, each exactly once. Redis keeps its data in an append-only file, so
the queue survives the restart.
"""
from __future__ import annotations

import time
from pathlib import Path

import pytest
import requests

from tests.integration.fault_stack import HEADERS, PrivateRedis, fault_service, wait_until

pytestmark = pytest.mark.integration

VISIBILITY_TIMEOUT_S = 60


def timed(method: str, url: str, **kwargs: object) -> tuple[requests.Response, float]:
    t0 = time.monotonic()
    r = requests.request(method, url, timeout=10, **kwargs)  # type: ignore[arg-type]
    return r, time.monotonic() - t0


def test_redis_restart_under_load_loses_nothing(tmp_path: Path) -> None:
    server = PrivateRedis(tmp_path / "redis")
    server.start()
    try:
        with fault_service(server.base, tmp_path, IMAGEGENX_MAX_BATCH="4",
                           IMAGEGENX_MAX_WAIT_MS="100",
                           IMAGEGENX_EXPECTED_BATCH_S="5",
                           IMAGEGENX_VISIBILITY_TIMEOUT_S=str(VISIBILITY_TIMEOUT_S),
                           # Guidance on every step: the running batch keeps its rows until it
                           # ends, so the buffer read below is still the buffer when Redis stops
                           # (with a shorter interval, rows free up mid-batch and admit more).
                           IMAGEGENX_GUIDANCE_INTERVAL="0,1") as svc:
            worker = svc.start_worker("reconnects")
            # 60 steps: about 1.6 s per batch of 4 (synthetic SD1.5-on-H200 cost).
            bodies = [{"prompt": f"a red kite {i}", "seed": 300 + i, "steps": 60}
                      for i in range(12)]
            ids = [svc.submit(b) for b in bodies]

            def mid_batch() -> bool:
                states = svc.states(ids)
                return "PROGRESS" in states.values() and "RECEIVED" in states.values()

            wait_until(mid_batch, 20, "a running batch and a buffer")
            states = svc.states(ids)
            buffered = [t for t, s in states.items() if s == "RECEIVED"]
            server.stop()
            down_at = time.monotonic()

            # The API answers at once, with JSON, while Redis is down.
            r, post_s = timed("POST", f"{svc.base}/api/v1/images", json={"prompt": "x"},
                              headers=HEADERS)
            assert r.status_code == 503 and r.headers["Content-Type"] == "application/json"
            assert "error" in r.json() and r.headers["Retry-After"]
            r, get_s = timed("GET", f"{svc.base}/api/v1/tasks/{ids[0]}", headers=HEADERS)
            assert r.status_code == 503 and "error" in r.json()
            r, health_s = timed("GET", f"{svc.base}/healthz")
            assert r.status_code == 503 and r.json()["redis"] is False
            assert max(post_s, get_s, health_s) < 1.0, (post_s, get_s, health_s)

            time.sleep(max(0.0, 2.0 - (time.monotonic() - down_at)))
            server.start()
            up_at = time.monotonic()
            late = svc.submit({"prompt": "after the restart", "seed": 399, "steps": 60})
            done = svc.wait_states(ids + [late], timeout=45)
            recovered_s = time.monotonic() - up_at

            for body, t in zip(bodies, ids):
                assert done[t]["state"] == "SUCCESS", done[t]
                assert done[t]["result"]["images"][0]["seed"] == body["seed"]
            assert done[late]["state"] == "SUCCESS"
            log = worker.output()
            assert worker.proc.poll() is None
            assert f"dropped {len(buffered)} buffered requests" in log, log[-4000:]
            assert (f"requeued {len(buffered)} of {len(buffered)} messages buffered on the lost "
                    "connection") in log
            # Each request ran once: none was delivered again after its result was
            # stored, and nothing is left unacknowledged.
            assert "already finished" not in log
            for t in ids:
                assert svc.deliveries(t)["started"] == 1
            for t in buffered:
                assert svc.deliveries(t)["received"] == 2
            assert not set(ids) & svc.unacked_ids()
            assert recovered_s < VISIBILITY_TIMEOUT_S / 2
            print(f"\nRedis down 2 s: POST {post_s * 1000:.0f} ms, GET {get_s * 1000:.0f} ms, "
                  f"/healthz {health_s * 1000:.0f} ms (503); all {len(ids) + 1} requests done "
                  f"{recovered_s:.1f} s after Redis came back ({len(buffered)} had been buffered)")
    finally:
        server.stop()
