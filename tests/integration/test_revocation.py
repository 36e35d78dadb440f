"""Revocation: a buffered request never runs; a running one leaves its batch."""
from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.integration.stack import API_KEY, Stack, running_stack
from tests.service import wait_task

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def slow_flush(redis_base: str, tiny_model: Path,
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A worker that holds requests in its buffer for 3 s before running them
    (request scheduler: max_wait; step scheduler: admit_delay)."""
    with running_stack(redis_base, tmp_path_factory.mktemp("revoke"), tiny_model,
                       name="slowflush", IMAGEGENX_MAX_WAIT_MS="3000",
                       IMAGEGENX_ADMIT_DELAY_MS="3000") as s:
        yield s


def submit(stack: Stack, body: dict) -> str:
    r = requests.post(f"{stack.base}/api/v1/images", json=body, headers=stack.headers, timeout=10)
    assert r.status_code == 202, r.text
    return r.json()["task_id"]


def state(stack: Stack, task_id: str) -> str:
    return requests.get(f"{stack.base}/api/v1/tasks/{task_id}", headers=stack.headers,
                        timeout=5).json()["state"]


def wait_state(stack: Stack, task_id: str, wanted: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while (current := state(stack, task_id)) != wanted:
        assert time.monotonic() < deadline, f"{task_id} is {current}, never {wanted}"
        time.sleep(0.02)


def test_buffered_request_is_listed_then_revoked_and_never_runs(slow_flush: Stack) -> None:
    keep = submit(slow_flush, {"prompt": "keep me", "seed": 1})
    drop = submit(slow_flush, {"prompt": "drop me", "seed": 2})
    wait_state(slow_flush, drop, "RECEIVED")

    inspect = slow_flush.celery.control.inspect([slow_flush.worker.hostname], timeout=2)
    reserved = inspect.reserved() or {}
    reserved_ids = {t["id"] for t in reserved.get(slow_flush.worker.hostname, [])}
    assert {keep, drop} <= reserved_ids

    r = requests.delete(f"{slow_flush.base}/api/v1/tasks/{drop}", headers=slow_flush.headers,
                        timeout=5)
    assert r.status_code == 202
    kept = wait_task(slow_flush.base, keep, API_KEY, 30)
    dropped = wait_task(slow_flush.base, drop, API_KEY, 30)
    assert kept["state"] == "SUCCESS"
    assert kept["result"]["batch"]["size"] == 1  # the revoked request did not run with it
    assert dropped["state"] == "REVOKED"
    time.sleep(0.5)
    assert state(slow_flush, drop) == "REVOKED"  # and nothing overwrote it
    assert not (slow_flush.log_dir / "images" / drop).exists()
    assert f"Discarding revoked task: imagegenx.generate[{drop}]" in slow_flush.worker.output()


def test_finished_task_cannot_be_revoked(slow_flush: Stack) -> None:
    task = submit(slow_flush, {"prompt": "done", "seed": 3})
    assert wait_task(slow_flush.base, task, API_KEY, 30)["state"] == "SUCCESS"
    r = requests.delete(f"{slow_flush.base}/api/v1/tasks/{task}", headers=slow_flush.headers,
                        timeout=5)
    assert r.status_code == 409


def test_running_request_leaves_its_batch_at_a_step_boundary(
    redis_base: str, tiny_model: Path, tmp_path: Path
) -> None:
    with running_stack(redis_base, tmp_path, tiny_model, name="running",
                       IMAGEGENX_MAX_WAIT_MS="300") as stack:
        body = {"width": 256, "height": 256, "steps": 100}
        stay = submit(stack, {**body, "prompt": "stays", "seed": 10})
        leave = submit(stack, {**body, "prompt": "leaves", "seed": 11})
        wait_state(stack, leave, "PROGRESS", timeout=30)
        r = requests.delete(f"{stack.base}/api/v1/tasks/{leave}", headers=stack.headers, timeout=5)
        assert r.status_code == 202
        left = wait_task(stack.base, leave, API_KEY, 60)
        stayed = wait_task(stack.base, stay, API_KEY, 120)
        assert left["state"] == "REVOKED"
        assert stayed["state"] == "SUCCESS"
        assert stayed["result"]["batch"]["requests"] == 2
        assert not (tmp_path / "images" / leave).exists()


def test_request_past_its_timeout_is_not_run(slow_flush: Stack) -> None:
    task = submit(slow_flush, {"prompt": "too late", "seed": 4, "timeout_s": 1})
    res = wait_task(slow_flush.base, task, API_KEY, 30)
    assert res["state"] == "REVOKED"
    assert "expired" in res["error"]["message"]
    assert not (slow_flush.log_dir / "images" / task).exists()


def test_revoked_while_no_worker_runs_is_never_run(
    redis_base: str, tiny_model: Path, tmp_path: Path
) -> None:
    """The revoke broadcast reaches nobody; the backend's REVOKED state still wins."""
    from imagegenx.api import create_app
    from tasks import create_celery_app
    from tests.integration.stack import settings_from_env, stack_env
    from tests.service import ApiServer, free_port, start_worker

    port = free_port()
    env = stack_env(redis_base, tmp_path, tiny_model, port)
    settings = settings_from_env(env)
    celery = create_celery_app(settings)
    with ApiServer(create_app(settings, celery), port) as api:
        headers = {"X-API-Key": API_KEY}
        ids = [requests.post(f"{api.base}/api/v1/images", json={"prompt": p, "seed": 1},
                             headers=headers, timeout=5).json()["task_id"] for p in ("a", "b")]
        assert requests.delete(f"{api.base}/api/v1/tasks/{ids[0]}", headers=headers,
                               timeout=5).status_code == 202
        worker = start_worker(env, tmp_path, name="late")
        try:
            assert wait_task(api.base, ids[1], API_KEY, 60)["state"] == "SUCCESS"
            assert wait_task(api.base, ids[0], API_KEY, 10)["state"] == "REVOKED"
            assert not (tmp_path / "images" / ids[0]).exists()
        finally:
            worker.stop()
