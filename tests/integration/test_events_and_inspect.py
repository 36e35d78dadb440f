"""Per-request task events (what Flower shows) and worker-state registration."""
from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.integration.stack import API_KEY, Stack, running_stack
from tests.service import wait_task

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def stack(redis_base: str, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with running_stack(redis_base, tmp_path_factory.mktemp("events"), tiny_model,
                       name="events", IMAGEGENX_MAX_WAIT_MS="200") as s:
        yield s


class EventLog:
    """Captures task events from the broker in a background thread.

    Consumes without a timeout (kombu's ``consume`` raises ``socket.timeout``
    after that long without an event, which ended the thread during any quiet
    second and lost the later events) and stops through the receiver's
    ``should_stop``. It is ready once its queue is bound: when the first event,
    its own ``test-bound`` probe or a worker heartbeat, has arrived.
    """

    def __init__(self, app: Any) -> None:
        self.app = app
        self.by_task: dict[str, list[dict[str, Any]]] = defaultdict(list)
        self.bound = threading.Event()
        self.error: BaseException | None = None
        self.receiver: Any = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            with self.app.connection_for_read() as conn:
                self.receiver = self.app.events.Receiver(conn, handlers={"*": self._on_event})
                for _ in self.receiver.itercapture(limit=None, timeout=None, wakeup=False):
                    pass
        except BaseException as exc:  # noqa: BLE001 - reported by __exit__
            self.error = exc

    def _on_event(self, event: dict[str, Any]) -> None:
        self.bound.set()
        if "uuid" in event:
            self.by_task[event["uuid"]].append(event)

    def __enter__(self) -> "EventLog":
        self.thread.start()
        with self.app.events.default_dispatcher() as probe:
            deadline = time.monotonic() + 10
            while not self.bound.wait(0.2) and time.monotonic() < deadline:
                probe.send("test-bound")
        assert self.bound.is_set(), f"the event receiver got nothing in 10 s ({self.error!r})"
        return self

    def __exit__(self, *exc: object) -> None:
        if self.receiver is not None:
            self.receiver.should_stop = True
        self.thread.join(5)
        if exc[0] is None:  # never hide the test's own failure
            assert self.error is None, f"the event receiver stopped: {self.error!r}"


def test_each_batched_request_has_its_own_events_and_runtime(stack: Stack) -> None:
    with EventLog(stack.celery) as events:
        ids = []
        for i in range(4):
            r = requests.post(f"{stack.base}/api/v1/images", json={"prompt": f"p{i}", "seed": i},
                              headers=stack.headers, timeout=5)
            ids.append(r.json()["task_id"])
        results = [wait_task(stack.base, t, API_KEY, 60) for t in ids]
        assert max(r["result"]["batch"]["size"] for r in results) > 1
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not all(
            any(e["type"] == "task-succeeded" for e in events.by_task[t]) for t in ids
        ):
            time.sleep(0.1)
    for task_id in ids:
        kinds = [e["type"] for e in events.by_task[task_id]]
        assert kinds[:1] == ["task-sent"] or "task-sent" in kinds
        for kind in ("task-received", "task-started", "task-succeeded"):
            assert kind in kinds, (task_id, kinds)
        received = next(e for e in events.by_task[task_id] if e["type"] == "task-received")
        assert received["name"] == "imagegenx.generate"
        assert received["hostname"] == stack.worker.hostname
        succeeded = next(e for e in events.by_task[task_id] if e["type"] == "task-succeeded")
        assert succeeded["runtime"] > 0


def test_inspect_active_shows_the_running_batch(stack: Stack) -> None:
    body = {"prompt": "a long one", "seed": 1, "width": 256, "height": 256, "steps": 60}
    task_id = requests.post(f"{stack.base}/api/v1/images", json=body, headers=stack.headers,
                            timeout=5).json()["task_id"]
    inspect = stack.celery.control.inspect([stack.worker.hostname], timeout=1)
    deadline = time.monotonic() + 20
    seen = False
    while time.monotonic() < deadline and not seen:
        active = (inspect.active() or {}).get(stack.worker.hostname, [])
        seen = any(t["id"] == task_id for t in active)
    assert seen, "running request not listed by inspect active"
    assert wait_task(stack.base, task_id, API_KEY, 60)["state"] == "SUCCESS"
    active = (inspect.active() or {}).get(stack.worker.hostname, [])
    assert all(t["id"] != task_id for t in active)


def test_worker_is_configured_by_the_app_not_by_flags(stack: Stack) -> None:
    stats = stack.celery.control.inspect([stack.worker.hostname], timeout=2).stats()
    mine = stats[stack.worker.hostname]
    assert mine["pool"]["implementation"].endswith("thread:TaskPool")
    assert mine["pool"]["max-concurrency"] == 1
    # Two batches, and under the step scheduler one more max_batch: images outside their
    # guidance interval take one UNet row, so up to 2 x max_batch of them run at once.
    assert stack.settings.scheduler == "step"
    assert mine["prefetch_count"] == 3 * stack.settings.max_batch == stack.settings.prefetch


def test_stats_and_live_batching_limits(stack: Stack) -> None:
    control = stack.celery.control
    host = stack.worker.hostname
    stats = control.inspect([host], timeout=2).stats()[host]["batching"]
    assert stats["max_batch"] == stack.settings.max_batch
    assert {"batch_size_histogram", "buffered_requests", "running_requests",
            "mean_buffer_wait_ms"} <= set(stats)

    reply = control.broadcast("set_batching", destination=[host], reply=True, timeout=2,
                              arguments={"max_batch": 4, "max_wait_ms": 20.0})
    assert "max_batch=4 max_wait_ms=20" in reply[0][host]["ok"]
    live = control.inspect([host], timeout=2)._request("batching")[host]
    assert (live["max_batch"], live["max_wait_ms"]) == (4, 20.0)
    assert control.inspect([host], timeout=2).stats()[host]["prefetch_count"] == 3 * 4  # the window follows

    bad = control.broadcast("set_batching", destination=[host], reply=True, timeout=2,
                            arguments={"max_batch": 0})
    assert "max_batch must be between" in bad[0][host]["error"]
    control.broadcast("set_batching", destination=[host], reply=True, timeout=2,
                      arguments={"max_batch": stack.settings.max_batch, "max_wait_ms": 200.0})


def test_queue_endpoint_shows_the_live_worker_and_its_throughput(stack: Stack) -> None:
    r = requests.post(f"{stack.base}/api/v1/images", json={"prompt": "q", "seed": 1, "steps": 4},
                      headers=stack.headers, timeout=5)
    wait_task(stack.base, r.json()["task_id"], API_KEY, 60)
    body = requests.get(f"{stack.base}/api/v1/queue", headers=stack.headers, timeout=10).json()
    assert [q["name"] for q in body["queues"]] == [stack.settings.queue,
                                                   stack.settings.webhook_queue_name]
    (worker,) = body["workers"]
    assert worker["hostname"] == stack.worker.hostname and worker["scheduler"] == "step"
    assert worker["max_batch"] == body["capacity_rows"] > 0
    assert worker["image_steps_per_s"] > 0
    assert body["drain"]["image_steps_per_s"] == pytest.approx(worker["image_steps_per_s"], abs=1e-3)
