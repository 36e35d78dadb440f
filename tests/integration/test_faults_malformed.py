"""A malformed broker message is rejected alone; the worker keeps serving.

Each message is published with kombu straight to a queue, as any broker client
could, bypassing the API. After each one the same worker process must still be
alive, nothing of the message may stay queued or unacknowledged, and a valid
request sent afterwards must succeed. One worker serves the whole module.
"""
from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import redis
from kombu import Connection, Exchange, Queue

from tasks.webhooks import WEBHOOK_TASK, delivery_record
from tests.integration.stack import API_KEY, Stack, running_stack
from tests.service import wait_task

pytestmark = pytest.mark.integration

GENERATE = "imagegenx.generate"
EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
VALID_WEBHOOK_KWARGS = {"url": "http://127.0.0.1:9/hook", "payload": {"state": "SUCCESS"}}


@pytest.fixture(scope="module")
def stack(redis_base: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with running_stack(redis_base, tmp_path_factory.mktemp("malformed"), None, name="malformed",
                       IMAGEGENX_ENGINE="synthetic") as s:
        yield s


def headers_for(task: str, task_id: str, /, **override: Any) -> dict[str, Any]:
    headers = {"lang": "py", "task": task, "id": task_id, "root_id": task_id,
               "parent_id": None, "group": None, "retries": 0, "eta": None, "expires": None,
               "timelimit": [None, None], "argsrepr": "()", "kwargsrepr": "{}",
               "origin": "test"}
    headers.update(override)
    return {k: v for k, v in headers.items() if v is not _DROP}


_DROP = object()


def publish(stack: Stack, queue: str, body: bytes, headers: dict[str, Any],
            content_type: str = "application/json") -> None:
    exchange = Exchange(queue, type="direct")
    with Connection(stack.settings.broker_url) as conn:
        conn.Producer().publish(body, exchange=exchange, routing_key=queue, headers=headers,
                                content_type=content_type, content_encoding="utf-8",
                                declare=[Queue(queue, exchange, routing_key=queue)])


def as_json(value: Any) -> bytes:
    return json.dumps(value).encode()


def future(seconds: float) -> str:
    return (datetime.now(timezone.utc) + timedelta(seconds=seconds)).isoformat()


def valid_kwargs(queue_kind: str) -> dict[str, Any]:
    if queue_kind == "generate":
        return {"prompt": "a valid request", "seed": 1, "steps": 2}
    return {"task_id": str(uuid.uuid4()), **VALID_WEBHOOK_KWARGS}


# (name, body, header overrides, content type). The task id is always a fresh
# uuid unless a case overrides "id".
CASES: list[tuple[str, Any, dict[str, Any], str]] = [
    ("body is a JSON string", as_json("just a string"), {}, "application/json"),
    ("body is a JSON object", as_json({"prompt": "x"}), {}, "application/json"),
    ("body is a JSON number", as_json(7), {}, "application/json"),
    ("body is null", as_json(None), {}, "application/json"),
    ("body has two parts", as_json([[], {}]), {}, "application/json"),
    ("body has four parts", as_json([[], {}, EMBED, 1]), {}, "application/json"),
    ("kwargs is a list", as_json([[], ["prompt"], EMBED]), {}, "application/json"),
    ("args is a string", as_json(["abc", {}, EMBED]), {}, "application/json"),
    ("embed is a string", as_json([[], {}, "embed"]), {}, "application/json"),
    ("huge body", as_json("x" * (8 << 20)), {}, "application/json"),
    ("body is not UTF-8", b"\xff\xfe\x00[\x80\x81]", {}, "application/json"),
    ("body is not JSON", b"[[], {}, {]", {}, "application/json"),
    ("content type is YAML", b"- []\n- {}\n- {}\n", {}, "application/x-yaml"),
    ("no id header", None, {"id": _DROP}, "application/json"),
    ("id is null", None, {"id": None}, "application/json"),
    ("id is a number", None, {"id": 12345}, "application/json"),
    ("id is an object", None, {"id": {"a": 1}}, "application/json"),
    ("no task header", None, {"task": _DROP}, "application/json"),
    ("unknown task", None, {"task": "imagegenx.nope"}, "application/json"),
    ("unknown task and no id", None, {"task": "imagegenx.nope", "id": _DROP},
     "application/json"),
    ("task is a number", None, {"task": 5}, "application/json"),
    ("eta is not a date", None, {"eta": "tomorrow"}, "application/json"),
    ("eta is a number", None, {"eta": 1700000000}, "application/json"),
    ("eta is a list", None, {"eta": ["2030-01-01"]}, "application/json"),
    ("eta is years away", None, {"eta": "9999-12-31T00:00:00+00:00"}, "application/json"),
    ("expires is not a date", None, {"expires": "never"}, "application/json"),
    ("expires is an object", None, {"expires": {"at": 1}}, "application/json"),
    ("retries is a string", None, {"retries": "many"}, "application/json"),
    ("retries is negative", None, {"retries": -1}, "application/json"),
    ("retries is a float", None, {"retries": 1.5}, "application/json"),
    ("timelimit is a string", None, {"timelimit": "abc"}, "application/json"),
    ("timelimit has one value", None, {"timelimit": [1]}, "application/json"),
    ("shadow is a number", None, {"shadow": 3}, "application/json"),
]

QUEUES = ["generate", "webhook"]


def queue_name(stack: Stack, kind: str) -> str:
    return stack.settings.queue if kind == "generate" else stack.settings.webhook_queue_name


def task_name(kind: str) -> str:
    return GENERATE if kind == "generate" else WEBHOOK_TASK


def settled(client: redis.Redis, queue: str, task_id: Any) -> bool:
    """Nothing of the message is left in the queue or unacknowledged."""
    if client.llen(queue):
        return False
    for raw in client.hvals("unacked"):
        if json.loads(raw)[0].get("headers", {}).get("id") == task_id:
            return False
    return True


def wait_for(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s: {what}")
        time.sleep(0.05)


def wait_result(stack: Stack, task_id: str, timeout: float = 30) -> dict[str, Any]:
    """The stored result of a task sent past the API (which knows only its own)."""
    deadline = time.monotonic() + timeout
    while True:
        meta = stack.celery.backend.get_task_meta(task_id, cache=False)
        if meta["status"] in ("SUCCESS", "FAILURE", "REVOKED"):
            return dict(meta)
        if time.monotonic() > deadline:
            raise AssertionError(f"{task_id} still {meta['status']} after {timeout} s")
        time.sleep(0.05)


def assert_still_serving(stack: Stack, kind: str) -> None:
    """The worker is alive and a valid request on the same queue completes."""
    assert stack.worker.proc.poll() is None, stack.worker.output()[-4000:]
    if kind == "generate":
        task_id = stack.submit(valid_kwargs(kind))
        assert wait_task(stack.base, task_id, API_KEY, 30)["state"] == "SUCCESS"
    else:
        kwargs = valid_kwargs(kind)
        record = delivery_record(stack.settings)
        stack.celery.send_task(WEBHOOK_TASK, kwargs=kwargs,
                               queue=stack.settings.webhook_queue_name)
        # No webhook secret is configured here: a delivery that ran says "refused".
        wait_for(lambda: (record.get(kwargs["task_id"]) or {}).get("state") == "refused", 30,
                 "the valid webhook delivery to run")
    assert stack.worker.proc.poll() is None, stack.worker.output()[-4000:]


@pytest.mark.parametrize("kind", QUEUES)
@pytest.mark.parametrize("name,body,override,content_type", CASES, ids=[c[0] for c in CASES])
def test_malformed_message_is_rejected_and_the_worker_keeps_serving(
        stack: Stack, kind: str, name: str, body: Any, override: dict[str, Any],
        content_type: str) -> None:
    assert stack.worker.proc.poll() is None, "the worker died in an earlier case"
    task_id = override.get("id", str(uuid.uuid4()))
    task = override.get("task", task_name(kind))
    headers = headers_for(task_name(kind), str(uuid.uuid4()), **override)
    if "id" not in override:
        headers["id"] = task_id
    if body is None:
        body = as_json([[], valid_kwargs(kind), EMBED])
    queue = queue_name(stack, kind)
    publish(stack, queue, body, headers, content_type)

    client = redis.Redis.from_url(stack.settings.broker_url)
    wait_for(lambda: settled(client, queue, headers.get("id")) or stack.worker.proc.poll() is not None,
             20, f"{name}: the message to be taken off the queue")
    assert_still_serving(stack, kind)
    assert settled(client, queue, headers.get("id"))

    usable_id = isinstance(task_id, str) and task is not _DROP
    if usable_id and task in (GENERATE, WEBHOOK_TASK) and content_type == "application/json":
        # The client polling this id is told why (the YAML message is refused
        # unread, as a pickle one is, and an unknown task is Celery's own case).
        meta = stack.celery.backend.get_task_meta(task_id, cache=False)
        assert meta["status"] == "FAILURE", (name, meta)
        assert "malformed message" in str(meta["result"]), meta


def test_each_rejection_is_logged_once_with_its_id(stack: Stack) -> None:
    task_id = str(uuid.uuid4())
    publish(stack, stack.settings.queue, as_json("just a string"),
            headers_for(GENERATE, task_id))
    client = redis.Redis.from_url(stack.settings.broker_url)
    wait_for(lambda: settled(client, stack.settings.queue, task_id), 20, "the rejection")
    assert_still_serving(stack, "generate")
    lines = [line for line in stack.worker.output().splitlines()
             if "Received invalid task message" in line and task_id in line]
    assert len(lines) == 1, lines
    assert "body must be [args, kwargs, embed]" in lines[0]


def test_generate_with_eta_waits_until_its_eta(stack: Stack) -> None:
    task_id = str(uuid.uuid4())
    eta = datetime.now(timezone.utc) + timedelta(seconds=3)
    publish(stack, stack.settings.queue,
            as_json([[], {"prompt": "later", "seed": 5, "steps": 2}, EMBED]),
            headers_for(GENERATE, task_id, eta=eta.isoformat()))
    # Scheduled, not running: the API reports it not started yet.
    time.sleep(1.0)
    meta = stack.celery.backend.get_task_meta(task_id, cache=False)
    assert meta["status"] == "PENDING", meta
    meta = wait_result(stack, task_id)
    assert meta["status"] == "SUCCESS", meta
    done = meta["date_done"]
    if isinstance(done, str):
        done = datetime.fromisoformat(done)
    if done.tzinfo is None:
        done = done.replace(tzinfo=timezone.utc)
    assert done >= eta, (done, eta)
    assert stack.worker.proc.poll() is None


def test_generate_with_eta_past_the_visibility_timeout_fails_with_a_reason(stack: Stack) -> None:
    task_id = str(uuid.uuid4())
    publish(stack, stack.settings.queue,
            as_json([[], {"prompt": "much later", "seed": 5, "steps": 2}, EMBED]),
            headers_for(GENERATE, task_id, eta=future(stack.settings.visibility_timeout_s)))
    meta = wait_result(stack, task_id)
    assert meta["status"] == "FAILURE", meta
    assert f"malformed message {task_id}: eta" in str(meta["result"])
    assert "visibility timeout" in str(meta["result"])
    assert_still_serving(stack, "generate")
