"""Scaling signals: GET /api/v1/queue over real Redis messages, the drain estimate,
and /healthz?ready. Workers are stood in for (their replies are the input here;
tests/integration/test_events_and_inspect.py asks a real one)."""
from __future__ import annotations

import time
import uuid
from typing import Any

import pytest
import redis

from imagegenx import scaling
from imagegenx.api import create_app, queue_status
from imagegenx.api.workers import worker_info
from imagegenx.settings import Settings


def _app(redis_base: str, **kw: Any) -> tuple[Any, Settings, str]:
    key = f"key-{uuid.uuid4().hex}"
    s = Settings(broker_url=f"{redis_base}/3", result_backend=f"{redis_base}/3",
                 queue=f"unit-queue-{uuid.uuid4().hex[:8]}", api_keys=[key], rate_limit="",
                 workers_inspect_timeout_s=0.2, **kw)
    return create_app(s), s, key


@pytest.fixture
def rdb(redis_base: str) -> redis.Redis:
    return redis.Redis.from_url(f"{redis_base}/3")


def test_drain_and_throughput_arithmetic() -> None:
    assert scaling.throughput({"unet_rows": 600, "unet_seconds": 2.0}) == 300.0
    assert scaling.throughput({"unet_rows": 0, "unet_seconds": 0.0}) is None
    assert scaling.throughput({}) is None
    assert scaling.drain_s(0, None, 0.0) == 0.0
    assert scaling.drain_s(10, 40.0, 200.0) == 2.0
    assert scaling.drain_s(10, 40.0, 0.0) is None
    assert scaling.image_steps(b"not json") is None and scaling.sent_at(b"{}") is None


def _fake_workers(monkeypatch: pytest.MonkeyPatch, rows: int, seconds: float) -> None:
    reply = {"max_batch": 8, "max_wait_ms": 50.0, "scheduler": "step", "buffered_requests": 2,
             "running_requests": 1, "unet_rows": rows, "unet_seconds": seconds}
    monkeypatch.setattr(queue_status, "live_workers",
                        lambda timeout: [worker_info("gpu0@host", reply)])


def test_queue_reports_depth_age_and_drain(redis_base: str, rdb: redis.Redis,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    app, s, key = _app(redis_base)
    client = app.test_client()
    headers = {"X-API-Key": key}
    try:
        assert client.get("/api/v1/queue").status_code == 401
        t0 = time.time()
        for body in ({"prompt": "a", "steps": 10}, {"prompt": "b", "steps": 30, "num_images": 2}):
            assert client.post("/api/v1/images", json=body, headers=headers).status_code == 202
        time.sleep(0.2)
        _fake_workers(monkeypatch, rows=700, seconds=2.0)  # 350 image-steps/s
        r = client.get("/api/v1/queue", headers=headers)
        assert r.status_code == 200, r.json
        gen, hooks = r.json["queues"]
        assert gen["name"] == s.queue and gen["depth"] == 2
        assert 0.2 <= gen["oldest_age_s"] <= time.time() - t0 + 0.05
        assert gen["model"] == s.default_model
        assert hooks == {"name": s.webhook_queue_name, "model": None, "depth": 0, "oldest_age_s": None}
        assert r.json["workers"] == [{"hostname": "gpu0@host", "scheduler": "step", "max_batch": 8,
                                      "buffered_requests": 2, "running_requests": 1,
                                      "image_steps_per_s": 350.0}]
        assert r.json["capacity_rows"] == 8
        # 2 queued + 2 buffered, (10 + 60) / 2 image-steps each, at 350 image-steps/s.
        assert r.json["drain"] == {"waiting_requests": 4, "mean_image_steps": 35.0,
                                   "image_steps_per_s": 350.0, "estimate_s": 0.4}
    finally:
        rdb.delete(s.queue)


def test_healthz_ready_is_503_past_the_drain_limit(redis_base: str, rdb: redis.Redis,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    app, s, key = _app(redis_base, ready_max_drain_s=1.0, health_rate_limit="")

    class Present:
        def workers(self) -> list[str]:
            return ["gpu0@host"]

    app.extensions["imagegenx.presence"] = Present()
    client = app.test_client()
    try:
        for _ in range(3):
            client.post("/api/v1/images", json={"prompt": "a", "steps": 50},
                        headers={"X-API-Key": key})
        _fake_workers(monkeypatch, rows=500, seconds=1.0)  # 5 x 50 / 500 = 0.5 s
        assert client.get("/healthz?ready").status_code == 200
        _fake_workers(monkeypatch, rows=100, seconds=1.0)  # 2.5 s
        r = client.get("/healthz?ready")
        assert r.status_code == 503 and r.json["drain_s"] == 2.5
        assert "busy" in r.json["status"]
        assert client.get("/healthz").status_code == 200  # liveness ignores the backlog
    finally:
        rdb.delete(s.queue)
