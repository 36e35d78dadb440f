"""The Redis result backend never replaces a SUCCESS, even when another worker stores
it between this write's read of the state and its write (real Redis)."""
from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from imagegenx.celery_client import client_app
from imagegenx.result_backend import GuardedRedisBackend, backend_url
from imagegenx.settings import Settings
from tests.integration.stack import TEST_DB

pytestmark = pytest.mark.integration


@pytest.fixture
def backend(redis_base: str) -> Iterator[Any]:
    url = f"{redis_base}/{TEST_DB}"
    app = client_app(Settings(broker_url=url, result_backend=url))
    backend = app.backend
    assert isinstance(backend, GuardedRedisBackend)
    yield backend


@pytest.fixture
def task_id(backend: Any) -> Iterator[str]:
    task_id = f"guard-{uuid.uuid4()}"
    yield task_id
    backend.client.delete(backend.get_key_for_task(task_id))


def test_later_writes_leave_a_success_alone(backend: Any, task_id: str) -> None:
    backend.store_result(task_id, {"step": 1, "total": 2}, "PROGRESS")
    backend.mark_as_done(task_id, {"images": ["first"]})
    backend.store_result(task_id, {"step": 2, "total": 2}, "PROGRESS")
    backend.mark_as_done(task_id, {"images": ["second"]})
    backend.mark_as_failure(task_id, RuntimeError("late failure"))
    meta = backend.get_task_meta(task_id)
    assert (meta["status"], meta["result"]) == ("SUCCESS", {"images": ["first"]})
    assert 0 < backend.client.ttl(backend.get_key_for_task(task_id)) <= backend.expires


@pytest.mark.parametrize("final", ["REVOKED", "FAILURE"])
def test_a_running_state_never_replaces_a_final_one(backend: Any, task_id: str, final: str) -> None:
    """A worker that has not yet received a revoke stores one more PROGRESS after the API
    marked the task REVOKED: the task stays REVOKED (and a final state may follow)."""
    backend.store_result(task_id, {"step": 3, "total": 100}, "PROGRESS")
    if final == "REVOKED":
        backend.mark_as_revoked(task_id, "revoked")
    else:
        backend.mark_as_failure(task_id, RuntimeError("failed"))
    backend.store_result(task_id, {"step": 4, "total": 100}, "PROGRESS")
    backend.store_result(task_id, {"hostname": "w"}, "STARTED")
    assert backend.get_task_meta(task_id)["status"] == final
    backend.mark_as_revoked(task_id, "revoked by the worker too")
    assert backend.get_task_meta(task_id)["status"] == "REVOKED"


def test_the_replacement_rule() -> None:
    from imagegenx.result_backend import may_replace

    assert may_replace(None, "PROGRESS") and may_replace("PROGRESS", "SUCCESS")
    assert may_replace("STARTED", "PROGRESS") and may_replace("REVOKED", "FAILURE")
    assert not may_replace("SUCCESS", "FAILURE") and not may_replace("SUCCESS", "PROGRESS")
    assert not may_replace("REVOKED", "PROGRESS") and not may_replace("FAILURE", "STARTED")


def test_success_stored_between_read_and_write_is_kept(backend: Any, task_id: str,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The interleaving of a worker cut off after reading the state: the other worker's
    SUCCESS lands before this write, which must then not happen."""
    backend.store_result(task_id, {"step": 5, "total": 10}, "PROGRESS")
    other = GuardedRedisBackend(app=backend.app, url=backend.url)
    decode = backend.decode_result
    reads: list[str] = []

    def read_then_other_worker_stores(payload: Any) -> dict[str, Any]:
        meta = decode(payload)
        reads.append(meta["status"])
        if len(reads) == 1:  # after this write's read: the other worker finishes first
            other.mark_as_done(task_id, {"images": ["from the other worker"]})
        return meta

    monkeypatch.setattr(backend, "decode_result", read_then_other_worker_stores)
    backend.mark_as_done(task_id, {"images": ["late"]})
    assert reads == ["PROGRESS", "SUCCESS"]  # the transaction saw the change and read again
    meta = other.get_task_meta(task_id)
    assert (meta["status"], meta["result"]) == ("SUCCESS", {"images": ["from the other worker"]})


def test_only_redis_urls_get_the_guarded_backend() -> None:
    assert backend_url("redis://h:6379/0") == \
        "imagegenx.result_backend:GuardedRedisBackend+redis://h:6379/0"
    assert backend_url("rediss://:pw@h/1").endswith("GuardedRedisBackend+rediss://:pw@h/1")
    assert backend_url("sentinel://s1:26379/0;sentinel://s2:26379/0").startswith(
        "imagegenx.result_backend:GuardedSentinelBackend+sentinel://")
    assert backend_url("db+postgresql://u@h/db") == "db+postgresql://u@h/db"
