"""Idempotent submission: the Idempotency-Key header, through the API with real Redis.

No worker is needed: the queue is a Redis list the tests read themselves.
"""
from __future__ import annotations

import threading
import uuid
from typing import Any

import pytest
import redis

from imagegenx.api import create_app
from imagegenx.api.errors import ApiError
from imagegenx.api.idempotency import IdempotencyStore, body_hash, check_header
from imagegenx.settings import Settings, hash_api_key


def _app(redis_base: str, **kw: Any) -> tuple[Any, Settings, str]:
    key = f"key-{uuid.uuid4().hex}"
    s = Settings(broker_url=f"{redis_base}/3", result_backend=f"{redis_base}/3",
                 queue=f"unit-idem-{uuid.uuid4().hex[:8]}", api_keys=[key], rate_limit="",
                 **kw)
    return create_app(s), s, key


@pytest.fixture
def rdb(redis_base: str) -> redis.Redis:
    return redis.Redis.from_url(f"{redis_base}/3")


def test_header_checks_name_the_header() -> None:
    assert check_header(None) is None
    assert check_header("order-42") == "order-42"
    assert check_header("x" * 128) == "x" * 128
    for bad, reason in (("", "empty"), ("x" * 129, "128"), ("a\tb", "printable"),
                        ("caf\u00e9", "printable")):
        with pytest.raises(ApiError) as err:
            check_header(bad)
        assert err.value.status == 400 and "Idempotency-Key" in err.value.message
        assert reason in err.value.message


def test_body_hash_is_canonical() -> None:
    assert body_hash({"a": 1, "b": [1, 2]}) == body_hash({"b": [1, 2], "a": 1})
    assert body_hash({"a": 1}) != body_hash({"a": 2})


def test_same_key_same_body_returns_the_first_task(redis_base: str, rdb: redis.Redis) -> None:
    app, s, key = _app(redis_base)
    client = app.test_client()
    headers = {"X-API-Key": key, "Idempotency-Key": "order-1"}
    try:
        first = client.post("/api/v1/images", json={"prompt": "x"}, headers=headers)
        assert first.status_code == 202, first.json
        # No seed in the body: the retry matches although the server picked one.
        again = client.post("/api/v1/images", json={"prompt": "x", "steps": 20}, headers=headers)
        assert again.status_code == 200, again.json
        assert again.json == first.json
        assert rdb.llen(s.queue) == 1
        other = client.post("/api/v1/images", json={"prompt": "y"}, headers=headers)
        assert other.status_code == 409 and "Idempotency-Key" in other.json["error"]
        assert other.json["task_id"] == first.json["task_id"]
        assert rdb.llen(s.queue) == 1
        # Another key, or no header: a new task.
        fresh = client.post("/api/v1/images", json={"prompt": "x"},
                            headers={"X-API-Key": key, "Idempotency-Key": "order-2"})
        assert fresh.status_code == 202 and fresh.json["task_id"] != first.json["task_id"]
        assert rdb.ttl(IdempotencyStore.key(hash_api_key(key), "order-1")) > s.result_expires_s - 60
    finally:
        rdb.delete(s.queue)


def test_bad_header_is_400_naming_it(redis_base: str, rdb: redis.Redis) -> None:
    app, s, key = _app(redis_base)
    r = app.test_client().post("/api/v1/images", json={"prompt": "x"},
                               headers={"X-API-Key": key, "Idempotency-Key": "x" * 129})
    assert r.status_code == 400 and r.json["field"] == "Idempotency-Key"
    assert rdb.llen(s.queue) == 0


def test_failed_submission_frees_the_key(redis_base: str, rdb: redis.Redis) -> None:
    app, s, key = _app(redis_base, max_queue_depth=1)
    client = app.test_client()
    rdb.rpush(s.queue, "filler")
    headers = {"X-API-Key": key, "Idempotency-Key": "retry-me"}
    try:
        assert client.post("/api/v1/images", json={"prompt": "x"}, headers=headers).status_code == 503
        rdb.delete(s.queue)
        r = client.post("/api/v1/images", json={"prompt": "x"}, headers=headers)
        assert r.status_code == 202 and rdb.llen(s.queue) == 1
    finally:
        rdb.delete(s.queue)


def test_concurrent_duplicates_create_one_task(redis_base: str, rdb: redis.Redis) -> None:
    app, s, key = _app(redis_base)
    headers = {"X-API-Key": key, "Idempotency-Key": f"burst-{uuid.uuid4().hex}"}
    start = threading.Barrier(20)
    answers: list[tuple[int, str]] = []

    def post() -> None:
        client = app.test_client()
        start.wait()
        r = client.post("/api/v1/images", json={"prompt": "burst"}, headers=headers)
        answers.append((r.status_code, r.json["task_id"]))

    threads = [threading.Thread(target=post) for _ in range(20)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert len(answers) == 20
        assert sorted(code for code, _ in answers) == [200] * 19 + [202]
        assert len({task for _, task in answers}) == 1
        assert rdb.llen(s.queue) == 1
    finally:
        rdb.delete(s.queue)
