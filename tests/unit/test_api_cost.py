"""Cost limits of the API: the largest cost of one request (422 naming cost),
each key's budget of cost units per minute in Redis (429 with Retry-After and
the cost in the body), the cost in the 202 answer and in /metrics.

No worker is needed: accepted requests stay in the test's Redis queue.
"""
from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import redis
from flask.testing import FlaskClient

from imagegenx.api import create_app
from imagegenx.settings import Settings
from tests.service import drop_queues

SMALL = {"prompt": "x", "width": 512, "height": 512, "steps": 10}  # 20 units


def new_key() -> str:
    return f"key-{uuid.uuid4().hex}"  # budgets live in Redis across runs


def settings(redis_base: str, **kw: Any) -> Settings:
    # Guidance on every step, so a step is 2 rows per image as the arithmetic below says
    # (the server default guides only [0, 0.4] of the steps).
    base = {"broker_url": f"{redis_base}/3", "result_backend": f"{redis_base}/3",
            "queue": f"unit-cost-{uuid.uuid4().hex[:8]}", "rate_limit": "", "guidance_interval": (0.0, 1.0)}
    return Settings(**(base | kw))


@contextmanager
def api(redis_base: str, **kw: Any) -> Iterator[tuple[FlaskClient, str, Settings]]:
    """A test client of an app with one fresh key; its queue is emptied afterwards."""
    key = new_key()
    s = settings(redis_base, api_keys=[key], **kw)
    try:
        yield create_app(s).test_client(), key, s
    finally:
        drop_queues(redis.Redis.from_url(s.broker_url), s)


@pytest.fixture
def rdb(redis_base: str) -> redis.Redis:
    return redis.Redis.from_url(f"{redis_base}/3")


def post(client: FlaskClient, key: str, **body: Any):  # type: ignore[no-untyped-def]
    return client.post("/api/v1/images", json=SMALL | body, headers={"X-API-Key": key})


def cost_metric(client: FlaskClient, outcome: str) -> float:
    line = f'imagegenx_api_cost_units_total{{outcome="{outcome}"}} '
    text = client.get("/metrics").get_data(as_text=True)
    return float(next(row for row in text.splitlines() if row.startswith(line)).split()[-1])


def test_accepted_request_answers_its_cost_and_counts_it(redis_base: str) -> None:
    with api(redis_base) as (client, key, s):
        before = cost_metric(client, "accepted")
        r = post(client, key, num_images=3)
        assert r.status_code == 202 and r.json["cost"] == 60  # 512x512 x 10 steps x 3 x 2 rows
        # An unset size is charged as max_size (cost_native_size 0).
        r = client.post("/api/v1/images", json={"prompt": "x", "steps": 10},
                        headers={"X-API-Key": key})
        assert r.status_code == 202 and r.json["cost"] == 80
        assert cost_metric(client, "accepted") == before + 140


def test_cost_native_size_sets_the_charge_of_an_unset_size(redis_base: str) -> None:
    with api(redis_base, cost_native_size=256) as (client, key, s):
        r = client.post("/api/v1/images", json={"prompt": "x", "steps": 10, "width": 512},
                        headers={"X-API-Key": key})
        assert r.status_code == 202 and r.json["cost"] == 10  # 512x256


def test_too_costly_request_is_422_naming_cost_the_limit_and_its_fields(
        redis_base: str, rdb: redis.Redis) -> None:
    with api(redis_base) as (client, key, s):  # default max_request_cost 1600
        before = cost_metric(client, "too_costly")
        r = client.post("/api/v1/images", json={"prompt": "x", "steps": 100, "num_images": 4},
                        headers={"X-API-Key": key})
        assert r.status_code == 422 and r.is_json
        assert r.json["cost"] == 3200 and r.json["max_cost"] == 1600
        [err] = r.json["fields"]
        assert err["field"] == "cost"
        for part in ("3200", "1600", "max_request_cost", "steps", "num_images", "width", "height",
                     "1024x1024 / 512x512 x 100 x 4 x 2",
                     "an unset width or height counts as 1024"):
            assert part in err["reason"], part
        assert rdb.llen(s.queue) == 0  # nothing queued
        assert cost_metric(client, "too_costly") == before + 3200
        # Just at the limit is accepted.
        r = client.post("/api/v1/images", json={"prompt": "x", "steps": 50, "num_images": 4},
                        headers={"X-API-Key": key})
        assert r.status_code == 202 and r.json["cost"] == 1600


def test_zero_turns_both_cost_limits_off(redis_base: str) -> None:
    with api(redis_base, max_request_cost=0, cost_budget_per_minute=0) as (client, key, s):
        body = {"prompt": "x", "steps": 100, "num_images": 4}
        answers = [client.post("/api/v1/images", json=body, headers={"X-API-Key": key})
                   for _ in range(4)]
        # 12800 units in a minute, each request still told its cost
        assert [(r.status_code, r.json["cost"]) for r in answers] == [(202, 3200)] * 4


def test_request_larger_than_the_whole_budget_is_422_not_429(redis_base: str) -> None:
    with api(redis_base, max_request_cost=0, cost_budget_per_minute=50) as (client, key, s):
        r = post(client, key, num_images=3)  # 60 units: could never fit
        assert r.status_code == 422
        assert r.json["fields"][0]["field"] == "cost"
        assert "cost_budget_per_minute" in r.json["fields"][0]["reason"]


def test_budget_counts_cost_not_requests_per_key_with_retry_after(
        redis_base: str, rdb: redis.Redis) -> None:
    a, b = new_key(), new_key()
    s = settings(redis_base, api_keys=[a, b], max_request_cost=100, cost_budget_per_minute=100)
    one, two = create_app(s).test_client(), create_app(s).test_client()
    try:
        before = cost_metric(one, "over_budget")
        assert post(one, a, num_images=2).status_code == 202  # 40
        assert post(two, a, num_images=2).status_code == 202  # 80: another API process, same budget
        r = post(one, a, num_images=2)  # 40 more than the 20 left
        assert r.status_code == 429 and r.is_json
        wait = int(r.headers["Retry-After"])
        assert 55 <= wait <= 61
        assert r.json["cost"] == 40 and r.json["budget_per_minute"] == 100
        assert r.json["retry_after_s"] == wait and r.json["frees_at"] > 0
        assert "cost budget" in r.json["error"] and "40" in r.json["error"]
        assert cost_metric(one, "over_budget") == before + 40
        assert rdb.llen(s.queue) == 2  # the refused one was not queued
        # What is left still fits a cheaper request; another key has its own budget.
        assert post(one, a).status_code == 202  # 20
        assert post(one, a, steps=1).status_code == 429  # 2 units, none left
        assert post(one, b, num_images=4).status_code == 202  # 80 of its own 100
        # Stored under the key's digest, never the plain key.
        stored = [k.decode() for k in rdb.keys("*imagegenx-cost*")]
        assert stored and not any(a in k for k in stored)
    finally:
        drop_queues(rdb, s)


def test_retry_after_is_when_enough_units_leave_the_window(
        redis_base: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Not when the oldest entry leaves: that may free too little for this request."""
    import time

    clock = [time.time()]
    monkeypatch.setattr(time, "time", lambda: clock[0])
    with api(redis_base, max_request_cost=100, cost_budget_per_minute=100) as (client, key, s):
        t0 = clock[0]
        assert post(client, key, steps=15).status_code == 202  # 30 units at t0
        clock[0] = t0 + 20
        assert post(client, key, steps=30).status_code == 202  # 60 units at t0 + 20
        clock[0] = t0 + 30
        r = post(client, key, steps=25)  # 50 units; 10 left
        assert r.status_code == 429
        # The 30 units of t0 leave at t0 + 60, still too few: the wait ends when
        # the 60 units of t0 + 20 leave, at t0 + 80 (just past it).
        assert r.headers["Retry-After"] == "51"
        clock[0] = t0 + 61
        assert post(client, key, steps=25).status_code == 429
        clock[0] = t0 + 30 + 51
        assert post(client, key, steps=25).status_code == 202
