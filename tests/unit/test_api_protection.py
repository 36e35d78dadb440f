"""Overload and abuse protection of the API: queue-depth limit (503 + Retry-After),
per-key rate limits counted in Redis (429 + Retry-After), hashed API keys, and
no endpoint hanging or failing with a 500 when Redis is down.

No worker is needed: the queue is a Redis list the tests fill themselves.
"""
from __future__ import annotations

import hashlib
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from flask.testing import FlaskClient

from imagegenx.api import create_app
from imagegenx.api.auth import match_key
from imagegenx.settings import Settings, hash_api_key
from tests.service import drop_queues

TASK = "00000000-0000-0000-0000-000000000000"


def new_key() -> str:
    # A fresh key per test: rate-limit windows live in Redis across runs.
    return f"key-{uuid.uuid4().hex}"


def settings(redis_base: str, **kw: Any) -> Settings:
    base = {"broker_url": f"{redis_base}/3", "result_backend": f"{redis_base}/3",
            "queue": f"unit-protect-{uuid.uuid4().hex[:8]}"}
    return Settings(**(base | kw))


@pytest.fixture
def rdb(redis_base: str) -> redis.Redis:
    return redis.Redis.from_url(f"{redis_base}/3")


# -- 1. queue depth ----------------------------------------------------------

def test_full_queue_answers_503_with_retry_after_and_queues_nothing(
        redis_base: str, rdb: redis.Redis) -> None:
    key = new_key()
    s = settings(redis_base, api_keys=[key], max_queue_depth=3, retry_after_s=7)
    app = create_app(s)
    client = app.test_client()
    svc = app.extensions["imagegenx"]
    calls: list[str] = []
    real_llen = svc.redis.llen
    svc.redis.llen = lambda name: calls.append(name) or real_llen(name)  # type: ignore[method-assign]
    try:
        for _ in range(3):
            r = client.post("/api/v1/images", json={"prompt": "x"}, headers={"X-API-Key": key})
            assert r.status_code == 202, r.json
        assert calls == [s.queue] * 3  # one LLEN of the queue key per submission
        assert rdb.llen(s.queue) == 3
        owners_before = len(rdb.keys("imagegenx:owner:*"))
        r = client.post("/api/v1/images", json={"prompt": "x"}, headers={"X-API-Key": key})
        assert r.status_code == 503 and r.is_json
        assert r.headers["Retry-After"] == "7"
        assert r.json["queue_depth"] == 3 and "retry later" in r.json["error"]
        assert rdb.llen(s.queue) == 3  # nothing was sent
        assert len(rdb.keys("imagegenx:owner:*")) == owners_before  # no task recorded
        rdb.lpop(s.queue)  # a worker takes one: submissions are accepted again
        r = client.post("/api/v1/images", json={"prompt": "x"}, headers={"X-API-Key": key})
        assert r.status_code == 202
    finally:
        drop_queues(rdb, s)


def test_invalid_request_is_422_even_when_the_queue_is_full(redis_base: str, rdb: redis.Redis) -> None:
    key = new_key()
    s = settings(redis_base, api_keys=[key], max_queue_depth=1)
    rdb.rpush(s.queue, "x")
    try:
        r = create_app(s).test_client().post("/api/v1/images", json={"prompt": ""},
                                             headers={"X-API-Key": key})
        assert r.status_code == 422
    finally:
        drop_queues(rdb, s)


def test_zero_depth_means_no_limit(redis_base: str, rdb: redis.Redis) -> None:
    key = new_key()
    s = settings(redis_base, api_keys=[key], max_queue_depth=0)
    rdb.rpush(s.queue, *["x"] * 50)
    try:
        r = create_app(s).test_client().post("/api/v1/images", json={"prompt": "x"},
                                             headers={"X-API-Key": key})
        assert r.status_code == 202
    finally:
        drop_queues(rdb, s)


# -- 2. rate limits ------------------------------------------------------------

def post(client: FlaskClient, key: str, addr: str = "127.0.0.1"):  # type: ignore[no-untyped-def]
    return client.post("/api/v1/images", json={"prompt": "x"}, headers={"X-API-Key": key},
                       environ_base={"REMOTE_ADDR": addr})


def test_rate_limit_is_per_key_and_answers_429_with_retry_after(redis_base: str, rdb: redis.Redis) -> None:
    a, b = new_key(), new_key()
    s = settings(redis_base, api_keys=[a, b], rate_limit="3/minute")
    client = create_app(s).test_client()
    try:
        # Key a from three different addresses: one budget, the key's.
        assert [post(client, a, f"10.0.0.{i}").status_code for i in range(3)] == [202] * 3
        r = post(client, a, "10.0.0.9")
        assert r.status_code == 429 and r.is_json
        assert "rate limit" in r.json["error"] and "3/minute" in r.json["error"]
        wait = int(r.headers["Retry-After"])
        assert 1 <= wait <= 60 and r.json["retry_after_s"] == wait
        # Key b from the same address as a's last request is not affected.
        assert post(client, b, "10.0.0.9").status_code == 202
        # A wrong key is 401, never 429, and is not counted.
        assert post(client, "wrong").status_code == 401
    finally:
        drop_queues(rdb, s)


def test_rate_limit_is_shared_by_api_processes_through_redis(redis_base: str, rdb: redis.Redis) -> None:
    key = new_key()
    s = settings(redis_base, api_keys=[key], rate_limit="3/minute")
    one, two = create_app(s).test_client(), create_app(s).test_client()
    try:
        codes = [post(one, key).status_code, post(two, key).status_code, post(one, key).status_code,
                 post(two, key).status_code]
        assert codes == [202, 202, 202, 429]
        digest = hash_api_key(key)
        stored = [k.decode() for k in rdb.keys("*imagegenx*")]
        assert any(digest in k for k in stored), stored  # counted under the key's digest
        assert not any(key in k for k in stored)  # never under the plain key
    finally:
        drop_queues(rdb, s)


def test_status_reads_have_their_own_limit(redis_base: str) -> None:
    key = new_key()
    s = settings(redis_base, api_keys=[key], status_rate_limit="2/minute")
    client = create_app(s).test_client()
    h = {"X-API-Key": key}
    codes = [client.get(f"/api/v1/tasks/{TASK}", headers=h).status_code for _ in range(3)]
    assert codes == [404, 404, 429]
    assert client.delete(f"/api/v1/tasks/{TASK}", headers=h).status_code == 429


def test_rate_limit_setting_is_checked() -> None:
    with pytest.raises(ValueError, match="not a rate limit"):
        Settings(rate_limit="sixty a minute")
    assert Settings(rate_limit="").rate_limit == ""
    assert Settings(rate_limit="10/second;500/hour").rate_limit == "10/second;500/hour"


# -- 2b. API keys are kept hashed ------------------------------------------------

def test_keys_given_as_sha256_digests_work_and_the_digest_itself_is_no_key(redis_base: str) -> None:
    key = new_key()
    digest = hashlib.sha256(key.encode()).hexdigest()
    s = settings(redis_base, api_key_hashes=[digest.upper()], rate_limit="")
    client = create_app(s).test_client()
    assert s.key_digests() == {digest}  # normalised to lower case
    assert client.get(f"/api/v1/tasks/{TASK}", headers={"X-API-Key": key}).status_code == 404
    assert client.get(f"/api/v1/tasks/{TASK}", headers={"X-API-Key": digest}).status_code == 401


def test_a_malformed_key_hash_is_a_configuration_error() -> None:
    with pytest.raises(ValueError, match="sha256 hex digests"):
        Settings(api_key_hashes=["not-a-digest"])


def test_plain_keys_never_appear_in_settings_output(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMAGEGENX_API_KEYS", "first-secret-key,second-secret-key")
    monkeypatch.setenv("IMAGEGENX_WEBHOOK_SECRET", "webhook-secret-value")
    s = Settings()
    for text in (repr(s), str(s), s.model_dump_json(), str(s.model_dump()),
                 str(s.model_dump(mode="json"))):
        assert "secret-key" not in text and "webhook-secret-value" not in text
    assert s.key_digests() == {hash_api_key("first-secret-key"), hash_api_key("second-secret-key")}


def test_every_stored_digest_is_compared(monkeypatch: pytest.MonkeyPatch) -> None:
    """No early exit: the comparison count does not depend on which key matches."""
    import imagegenx.api.auth as auth

    digests = [hash_api_key(f"k{i}") for i in range(5)]
    seen: list[int] = []
    real = auth.hmac.compare_digest

    def counting(a: str, b: str) -> bool:
        seen.append(1)
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", counting)
    for presented in ("k0", "k4", "nobody"):
        seen.clear()
        found = match_key(presented, digests)
        assert len(seen) == len(digests)
        assert found == (hash_api_key(presented) if presented != "nobody" else None)


# -- 6. Redis down: 503 JSON within a second, never a hang -------------------

@pytest.fixture
def silent_redis() -> Iterator[str]:
    """A port that accepts connections and never answers (a hung Redis)."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(64)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        srv.settimeout(0.1)
        while not stop.is_set():
            try:
                held.append(srv.accept()[0])
            except OSError:
                continue

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    yield f"redis://127.0.0.1:{srv.getsockname()[1]}/0"
    stop.set()
    t.join()
    for c in held:
        c.close()
    srv.close()


def closed_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"redis://127.0.0.1:{port}/0"


ENDPOINTS = [
    ("post", "/api/v1/images", {"json": {"prompt": "x"}}, 503),
    ("post", "/api/v1/images", {"json": {"prompt": "x", "callback_url": "https://example.com/h"}}, 503),
    ("get", f"/api/v1/tasks/{TASK}", {}, 503),
    ("delete", f"/api/v1/tasks/{TASK}", {}, 503),
    ("get", "/healthz", {}, 503),
    ("get", "/api/v1/openapi.json", {}, 200),
    ("get", "/api/v1/files/abc/0.png", {}, 404),
]


@pytest.mark.parametrize("down", ["closed port", "hung server"])
def test_no_endpoint_hangs_or_fails_when_redis_is_down(down: str, silent_redis: str) -> None:
    url = closed_port() if down == "closed port" else silent_redis
    key = new_key()
    s = Settings(broker_url=url, result_backend=url, api_keys=[key], webhook_secret="s")
    t0 = time.perf_counter()
    client = create_app(s).test_client()
    assert time.perf_counter() - t0 < 1.0  # building the app does not wait for Redis
    for method, path, kw, expected in ENDPOINTS:
        t0 = time.perf_counter()
        r = getattr(client, method)(path, headers={"X-API-Key": key}, **kw)
        elapsed = time.perf_counter() - t0
        assert elapsed < 1.0, (method, path, elapsed)
        assert r.status_code == expected, (method, path, r.status_code, r.get_data(as_text=True))
        if path.endswith(".png") or path.startswith("/api/v1/openapi"):
            continue
        assert r.is_json and "error" in r.json or path == "/healthz", (method, path, r.json)
        if expected == 503 and path != "/healthz":
            assert r.headers["Retry-After"] == str(s.retry_after_s)
    health = client.get("/healthz")
    assert health.json["redis"] is False and health.json["status"] == "degraded"
