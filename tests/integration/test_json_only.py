"""The worker accepts JSON messages only: a pickle message is refused unread.

The pickled body, if it were ever unpickled, would create a marker file: the
marker staying absent proves that nothing was deserialised or run. The worker
logs the content-type refusal and keeps serving JSON requests.
"""
from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from kombu import Connection, Exchange, Queue

from tests.integration.stack import API_KEY, Stack, running_stack
from tests.service import wait_task

pytestmark = pytest.mark.integration


class Tripwire:
    """Unpickling this calls open(path, "w"), creating the file."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (open, (self.path, "w"))


@pytest.fixture(scope="module")
def stack(redis_base: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with running_stack(redis_base, tmp_path_factory.mktemp("json-only"), None, name="jsononly",
                       IMAGEGENX_ENGINE="synthetic") as s:
        yield s


def publish_pickle(stack: Stack, queue: str, task: str, kwargs: dict, protocol2: bool = True) -> str:
    task_id = str(uuid.uuid4())
    headers = {"lang": "py", "task": task, "id": task_id, "root_id": task_id, "parent_id": None,
               "group": None, "retries": 0, "eta": None, "expires": None,
               "timelimit": [None, None], "argsrepr": "()", "kwargsrepr": "{}", "origin": "test"}
    body: object = ((), kwargs, {"callbacks": None, "errbacks": None, "chain": None, "chord": None})
    if not protocol2:  # protocol 1: everything in the body, no task header
        body, headers = {"task": task, "id": task_id, "args": (), "kwargs": kwargs}, {}
    exchange = Exchange(queue, type="direct")
    with Connection(stack.settings.broker_url) as conn:
        producer = conn.Producer(serializer="pickle")
        producer.publish(body, exchange=exchange, routing_key=queue, headers=headers,
                         declare=[Queue(queue, exchange, routing_key=queue)])
    return task_id


def wait_log(stack: Stack, text: str, count: int, timeout: float = 20) -> str:
    deadline = time.monotonic() + timeout
    out = ""
    while time.monotonic() < deadline:
        out = stack.worker.output()
        if out.count(text) >= count:
            return out
        time.sleep(0.1)
    raise AssertionError(f"{text!r} not logged {count} times:\n{out[-3000:]}")


def test_pickle_messages_are_refused_unread_and_the_worker_keeps_serving(
        stack: Stack, tmp_path: Path) -> None:
    # One log record per refused message: protocol 2 messages are refused when
    # the task's strategy reads the body, protocol 1 ones when Celery decodes it.
    refusal = "Received invalid task message: Refusing to deserialize untrusted content of type pickle"
    undecodable = "Can't decode message body: ContentDisallowed('Refusing to deserialize untrusted"
    before = stack.worker.output().count(refusal), stack.worker.output().count(undecodable)
    markers = [tmp_path / f"unpickled-{i}" for i in range(3)]
    ids = [
        publish_pickle(stack, stack.settings.queue, "imagegenx.generate",
                       {"prompt": Tripwire(markers[0])}),
        publish_pickle(stack, stack.settings.queue, "imagegenx.generate",
                       {"prompt": Tripwire(markers[1])}, protocol2=False),
        publish_pickle(stack, stack.settings.webhook_queue_name, "imagegenx.deliver_webhook",
                       {"task_id": Tripwire(markers[2]), "url": "http://example.com/", "payload": {}}),
    ]
    wait_log(stack, refusal, before[0] + 2)
    out = wait_log(stack, undecodable, before[1] + 1)
    assert "application/x-python-serialize" in out
    assert not any(m.exists() for m in markers), "a pickle body was deserialised"

    # Refused messages are consumed and dropped: nothing is left queued, and
    # no result of any kind was stored for them.
    import redis

    client = redis.Redis.from_url(stack.settings.broker_url)
    for queue in (stack.settings.queue, stack.settings.webhook_queue_name):
        assert client.llen(queue) == 0
    for task_id in ids:
        assert client.get(f"celery-task-meta-{task_id}") is None

    # The same worker still serves JSON requests.
    r = requests.post(f"{stack.base}/api/v1/images", headers=stack.headers, timeout=10,
                      json={"prompt": "still serving", "seed": 3})
    assert r.status_code == 202
    assert wait_task(stack.base, r.json()["task_id"], API_KEY, 30)["state"] == "SUCCESS"
    assert stack.worker.proc.poll() is None
    assert not any(m.exists() for m in markers)


def test_the_app_accepts_json_only() -> None:
    from tasks import create_celery_app

    conf = create_celery_app().conf
    assert conf.accept_content == ["json"] and conf.task_serializer == "json"
    assert conf.result_accept_content == ["json"] and conf.result_serializer == "json"
    assert os.environ.get("CELERY_ACCEPT_CONTENT") is None
