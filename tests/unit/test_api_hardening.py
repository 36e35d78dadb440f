"""Hardening of the API against an outside attack: /healthz under concurrent
load and its own limit, the per-key limit of /api/v1/workers, and status_url
built from the configured public address, never the request's Host header."""
from __future__ import annotations

import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import redis

from imagegenx.api import create_app
from imagegenx.settings import Settings
from tests.service import drop_queues


class FakeControl:
    """Celery's control API as a worker that is slow to answer broadcasts under load."""

    def __init__(self) -> None:
        self.pings = 0
        self.lock = threading.Lock()

    def ping(self, timeout: float) -> list[dict[str, Any]]:
        with self.lock:
            self.pings += 1
        time.sleep(0.05)
        return [{"w1@host": {"ok": "pong"}}]

    def broadcast(self, *_a: Any, **_kw: Any) -> list[dict[str, Any]]:
        return []


class FakeCelery:
    def __init__(self) -> None:
        self.control = FakeControl()
        self.sent: list[dict[str, Any]] = []

    def send_task(self, name: str, **kw: Any) -> None:
        self.sent.append(kw)


def settings(redis_base: str, **kw: Any) -> Settings:
    base = {"broker_url": f"{redis_base}/3", "result_backend": f"{redis_base}/3",
            "queue": f"unit-harden-{uuid.uuid4().hex[:8]}"}
    return Settings(**(base | kw))


def new_key() -> str:
    return f"key-{uuid.uuid4().hex}"  # rate-limit windows live in Redis across runs


def test_concurrent_health_checks_send_one_worker_ping_and_all_answer_200(redis_base: str) -> None:
    celery = FakeCelery()
    app = create_app(settings(redis_base, health_rate_limit=""), celery_app=celery)

    def check(_: int) -> int:
        return app.test_client().get("/healthz").status_code

    with ThreadPoolExecutor(48) as pool:
        codes = list(pool.map(check, range(48 * 4)))
    assert codes == [200] * len(codes)
    # One broadcast answers them all: 48 at once made a busy worker answer late.
    assert celery.control.pings == 1


def test_health_checks_have_a_limit_per_address(redis_base: str) -> None:
    app = create_app(settings(redis_base, health_rate_limit="3/minute"), celery_app=FakeCelery())
    client = app.test_client()

    def health(addr: str) -> int:
        return client.get("/healthz", environ_base={"REMOTE_ADDR": addr}).status_code

    assert [health("10.1.0.1") for _ in range(4)] == [200, 200, 200, 429]
    r = client.get("/healthz", environ_base={"REMOTE_ADDR": "10.1.0.1"})
    assert r.is_json and "health checks" in r.json["error"] and r.headers["Retry-After"]
    assert health("10.1.0.2") == 200  # a load balancer elsewhere is not affected


@pytest.mark.parametrize("path", ["/api/v1/workers", "/api/v1/queue"])
def test_worker_listing_has_a_limit_per_key(redis_base: str, path: str) -> None:
    """Both endpoints ask every worker, so both have the per-key worker-listing limit."""
    a, b = new_key(), new_key()
    app = create_app(settings(redis_base, api_keys=[a, b], workers_rate_limit="2/minute",
                              workers_inspect_timeout_s=0.1), celery_app=FakeCelery())
    client = app.test_client()

    def workers(key: str) -> int:
        return client.get(path, headers={"X-API-Key": key}).status_code

    assert [workers(a) for _ in range(3)] == [200, 200, 429]
    assert workers(b) == 200
    assert workers("wrong") == 401


def test_status_url_uses_the_public_url_not_the_host_header(redis_base: str) -> None:
    key = new_key()
    s = settings(redis_base, api_keys=[key], rate_limit="", public_url="https://images.example.com/")
    try:
        client = create_app(s, celery_app=FakeCelery()).test_client()
        r = client.post("/api/v1/images", json={"prompt": "x"},
                        headers={"X-API-Key": key, "Host": "attacker.example"})
        assert r.status_code == 202, r.json
        want = f"https://images.example.com/api/v1/tasks/{r.json['task_id']}"
        assert r.json["status_url"] == want and r.headers["Location"] == want
    finally:
        drop_queues(redis.Redis.from_url(s.broker_url), s)
