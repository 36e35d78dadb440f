"""Fair share between API keys: the cap on unfinished tasks per key (429) and each
key's highest priority (422), through the API with real Redis and the real result
backend (a finished task is one whose result is stored there, as a worker stores it)."""
from __future__ import annotations

import uuid
from typing import Any

import pytest
import redis
from celery import states
from pydantic import ValidationError

from imagegenx.api import create_app
from imagegenx.api.fairness import finished
from imagegenx.settings import Settings, hash_api_key


def new_key() -> str:
    return f"key-{uuid.uuid4().hex}"


def _app(redis_base: str, keys: list[str], **kw: Any) -> tuple[Any, Settings]:
    s = Settings(broker_url=f"{redis_base}/3", result_backend=f"{redis_base}/3",
                 queue=f"unit-fair-{uuid.uuid4().hex[:8]}", api_keys=keys, rate_limit="", **kw)
    return create_app(s), s


@pytest.fixture
def rdb(redis_base: str) -> redis.Redis:
    return redis.Redis.from_url(f"{redis_base}/3")


def test_finished_keeps_only_final_states() -> None:
    seen = {"a": states.SUCCESS, "b": "PROGRESS", "c": states.REVOKED, "d": states.PENDING,
            "e": states.FAILURE, "f": "RECEIVED"}
    assert finished(seen, seen.__getitem__) == ["a", "c", "e"]


def test_unfinished_cap_is_429_until_a_task_finishes(redis_base: str, rdb: redis.Redis) -> None:
    key, other = new_key(), new_key()
    app, s = _app(redis_base, [key, other], max_unfinished_per_key=2, retry_after_s=9)
    client = app.test_client()
    backend = app.extensions["imagegenx"].celery.backend
    headers = {"X-API-Key": key}
    try:
        ids = []
        for _ in range(2):
            r = client.post("/api/v1/images", json={"prompt": "x"}, headers=headers)
            assert r.status_code == 202, r.json
            ids.append(r.json["task_id"])
        backend.store_result(ids[0], None, "PROGRESS")  # running is unfinished
        r = client.post("/api/v1/images", json={"prompt": "x"}, headers=headers)
        assert r.status_code == 429 and r.headers["Retry-After"] == "9"
        assert r.json["unfinished"] == 2 and r.json["max_unfinished"] == 2
        assert rdb.llen(s.queue) == 2
        # Another key has its own count.
        assert client.post("/api/v1/images", json={"prompt": "x"},
                                       headers={"X-API-Key": other}).status_code == 202
        backend.store_result(ids[0], {"images": []}, states.SUCCESS)  # the worker finished it
        r = client.post("/api/v1/images", json={"prompt": "x"}, headers=headers)
        assert r.status_code == 202, r.json
        assert client.post("/api/v1/images", json={"prompt": "x"},
                           headers=headers).status_code == 429
        client.delete(f"/api/v1/tasks/{ids[1]}", headers=headers)  # a revoked task is finished
        assert client.post("/api/v1/images", json={"prompt": "x"},
                           headers=headers).status_code == 202
        assert rdb.zcard(f"imagegenx:unfinished:{hash_api_key(key)}") == 2
    finally:
        rdb.delete(s.queue)


def test_priority_is_bounded_per_key(redis_base: str, rdb: redis.Redis) -> None:
    key, other = new_key(), new_key()
    app, s = _app(redis_base, [key, other], key_max_priority=f"{hash_api_key(key)}:3")
    client = app.test_client()
    try:
        ok = client.post("/api/v1/images", json={"prompt": "x", "priority": 3},
                         headers={"X-API-Key": key})
        assert ok.status_code == 202
        r = client.post("/api/v1/images", json={"prompt": "x", "priority": 4},
                        headers={"X-API-Key": key})
        assert r.status_code == 422
        assert r.json["fields"] == [{"field": "priority",
                                     "reason": "at most 3 for this API key (key_max_priority)"}]
        # A key not listed keeps max_priority.
        assert client.post("/api/v1/images", json={"prompt": "x", "priority": 10},
                           headers={"X-API-Key": other}).status_code == 202
        assert rdb.llen(s.queue) == 2
    finally:
        rdb.delete(s.queue)


def test_key_max_priority_setting_is_parsed_and_checked() -> None:
    digest = "a" * 64
    assert Settings(key_max_priority=f"{digest}:5, {'b' * 64}:0").key_max_priority == {
        digest: 5, "b" * 64: 0}
    assert Settings(key_max_priority={digest: 20}, max_priority=10).priority_cap(digest) == 10
    for bad in ("nodigest", "abc:5", f"{digest}:x", f"{digest}:-1"):
        with pytest.raises(ValidationError, match="key_max_priority"):
            Settings(key_max_priority=bad)
