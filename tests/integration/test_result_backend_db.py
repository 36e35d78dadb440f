"""PostgreSQL as the result backend (Celery's database backend): task history outlives Redis."""
from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import requests
from celery.result import AsyncResult

from tests.integration.stack import API_KEY, Stack, running_stack
from tests.service import wait_task

pytestmark = pytest.mark.integration

PG_HOST = os.environ.get("IMAGEGENX_TEST_PG_HOST", "127.0.0.1")
PG_PORT = int(os.environ.get("IMAGEGENX_TEST_PG_PORT", "5432"))
PG_USER = os.environ.get("IMAGEGENX_TEST_PG_USER", "postgres")
OTHER_KEY = "another-key-9876543210"
# This module flushes its Redis database: one of its own, not the other tests'.
FLUSHED_DB = 9


def _admin():  # type: ignore[no-untyped-def]
    psycopg = pytest.importorskip("psycopg", reason="PostgreSQL driver not installed "
                                                   "(pip install '.[postgres]')")
    try:
        return psycopg.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, dbname="postgres",
                               connect_timeout=2, autocommit=True)
    except psycopg.OperationalError as exc:
        pytest.skip(f"PostgreSQL does not answer on {PG_HOST}:{PG_PORT} as {PG_USER}: {exc}")


@pytest.fixture(scope="module")
def pg_url() -> Iterator[str]:
    """A throwaway database for this test session, dropped afterwards."""
    admin = _admin()
    name = f"imagegenx_test_{uuid.uuid4().hex[:12]}"
    with admin.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql://{PG_USER}@{PG_HOST}:{PG_PORT}/{name}"
    finally:
        with admin.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


@pytest.fixture(scope="module")
def stack(redis_base: str, tiny_model: Path, pg_url: str,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with running_stack(redis_base, tmp_path_factory.mktemp("pg"), tiny_model, name="pg",
                       IMAGEGENX_BROKER_URL=f"{redis_base}/{FLUSHED_DB}",
                       IMAGEGENX_RESULT_BACKEND=f"db+{pg_url}", IMAGEGENX_MAX_WAIT_MS="100",
                       IMAGEGENX_API_KEYS=f"{API_KEY},{OTHER_KEY}") as s:
        yield s


def rows(pg_url: str, sql: str, *args: object) -> list[tuple]:
    import psycopg

    with psycopg.connect(pg_url) as conn:
        return conn.execute(sql, args).fetchall()


def test_results_live_in_postgres_and_survive_a_redis_flush(stack: Stack, pg_url: str) -> None:
    assert stack.celery.backend.__class__.__name__ == "DatabaseBackend"
    body = {"prompt": "kept in postgres", "seed": 5, "num_images": 2, "steps": 12}
    r = requests.post(f"{stack.base}/api/v1/images", json=body, headers=stack.headers, timeout=10)
    assert r.status_code == 202, r.text
    task_id = r.json()["task_id"]
    seen = set()
    for _ in range(2000):  # the worker's RECEIVED/STARTED/PROGRESS states are stored in PostgreSQL too
        state = wait_task(stack.base, task_id, API_KEY, 60,
                          states=("RECEIVED", "STARTED", "PROGRESS", "SUCCESS", "FAILURE", "REVOKED"))
        seen.add(state["state"])
        if state["state"] in ("SUCCESS", "FAILURE", "REVOKED"):
            break
    assert state["state"] == "SUCCESS", state
    assert "PROGRESS" in seen, seen
    assert [im["seed"] for im in state["result"]["images"]] == [5, 6]

    (row,) = rows(pg_url, "SELECT status, name, worker FROM celery_taskmeta WHERE task_id = %s", task_id)
    assert row == ("SUCCESS", "imagegenx.generate", stack.worker.hostname)

    # Redis loses everything: queue, events, ownership keys and any cached state.
    redis.Redis.from_url(stack.env["IMAGEGENX_BROKER_URL"]).flushdb()

    result = AsyncResult(task_id, app=stack.celery)
    assert result.state == "SUCCESS"
    assert result.get(timeout=5)["images"] == state["result"]["images"]
    again = requests.get(f"{stack.base}/api/v1/tasks/{task_id}", headers=stack.headers, timeout=5)
    assert again.status_code == 200, again.text
    assert again.json()["result"] == state["result"]
    # Ownership survived too: another key still cannot see it.
    other = requests.get(f"{stack.base}/api/v1/tasks/{task_id}", headers={"X-API-Key": OTHER_KEY},
                         timeout=5)
    assert other.status_code == 404

    # The service goes on after the flush (a new request through the same worker).
    r = requests.post(f"{stack.base}/api/v1/images", json={"prompt": "after", "seed": 1},
                      headers=stack.headers, timeout=10)
    assert wait_task(stack.base, r.json()["task_id"], API_KEY, 60)["state"] == "SUCCESS"


def test_success_is_never_overwritten(stack: Stack) -> None:
    """As with Redis, a late or repeated write after SUCCESS leaves the result alone."""
    r = requests.post(f"{stack.base}/api/v1/images", json={"prompt": "once", "seed": 2},
                      headers=stack.headers, timeout=10)
    task_id = r.json()["task_id"]
    done = wait_task(stack.base, task_id, API_KEY, 60)
    assert done["state"] == "SUCCESS"
    backend = stack.celery.backend
    backend.store_result(task_id, {"step": 1, "total": 20}, "PROGRESS")
    backend.store_result(task_id, {"hostname": "x"}, "STARTED")
    backend.mark_as_failure(task_id, RuntimeError("a redelivered copy failed"))
    after = requests.get(f"{stack.base}/api/v1/tasks/{task_id}", headers=stack.headers, timeout=5).json()
    assert after["state"] == "SUCCESS" and after["result"] == done["result"]


def batching(stack: Stack) -> dict:
    reply = stack.celery.control.broadcast("batching", destination=[stack.worker.hostname],
                                           reply=True, timeout=2, limit=1)
    return reply[0][stack.worker.hostname]


def test_failure_and_revoked_states_are_read_from_postgres(stack: Stack) -> None:
    bad = stack.celery.send_task("imagegenx.generate", kwargs={"prompt": "x", "width": 65},
                                 queue=stack.settings.queue)
    bad.get(timeout=30, propagate=False)
    assert bad.state == "FAILURE" and "multiple of 8" in str(bad.result)

    # A revoke stored while no worker listened is found in PostgreSQL by the worker.
    revoked_before = batching(stack)["revoked"]
    task_id = str(uuid.uuid4())
    stack.celery.backend.mark_as_revoked(task_id, "revoked")
    stack.celery.send_task("imagegenx.generate", kwargs={"prompt": "never"}, task_id=task_id,
                           queue=stack.settings.queue)
    for _ in range(100):
        if batching(stack)["revoked"] > revoked_before:
            break
    assert batching(stack)["revoked"] == revoked_before + 1
    assert AsyncResult(task_id, app=stack.celery).state == "REVOKED"

    # Revoking a finished task over REST reads its state from PostgreSQL: 409.
    r = requests.post(f"{stack.base}/api/v1/images", json={"prompt": "done", "seed": 3},
                      headers=stack.headers, timeout=10)
    done_id = r.json()["task_id"]
    assert wait_task(stack.base, done_id, API_KEY, 60)["state"] == "SUCCESS"
    gone = requests.delete(f"{stack.base}/api/v1/tasks/{done_id}", headers=stack.headers, timeout=5)
    assert gone.status_code == 409
