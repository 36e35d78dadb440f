"""GET /api/v1/tasks/<id>/events and callback_events through HTTP, with a real
worker (synthetic engine priced as an SD1.5 step on an H200, so a request takes
a few tenths of a second and reports progress at every step)."""
from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from imagegenx.client import Client
from tests.integration.stack import API_KEY, Stack, running_stack
from tests.service import wait_task
from tests.unit.test_webhooks import Receiver

pytestmark = pytest.mark.integration

OTHER_KEY = "other-key-0123456789"


@pytest.fixture(scope="module")
def stack(redis_base: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with running_stack(redis_base, tmp_path_factory.mktemp("events"), None, name="events",
                       IMAGEGENX_ENGINE="synthetic", IMAGEGENX_SYNTHETIC_COST="sd15-h200",
                       IMAGEGENX_API_KEYS=f"{API_KEY},{OTHER_KEY}",
                       IMAGEGENX_WEBHOOK_SECRET="events-secret",
                       IMAGEGENX_WEBHOOK_ALLOW_HOSTS="127.0.0.1",
                       IMAGEGENX_EVENTS_POLL_S="0.2") as s:
        yield s


def read_events(stack: Stack, task_id: str, last_id: str | None = None, stop_after: int | None = None,
                key: str = API_KEY) -> tuple[int, list[dict[str, Any]]]:
    """(status, events) of one connection: each event's id (or None), name and data."""
    headers = {"X-API-Key": key, "Accept": "text/event-stream"}
    if last_id is not None:
        headers["Last-Event-ID"] = last_id
    out: list[dict[str, Any]] = []
    with requests.get(f"{stack.base}/api/v1/tasks/{task_id}/events", headers=headers, stream=True,
                      timeout=30) as r:
        if r.status_code != 200:
            return r.status_code, out
        assert r.headers["Content-Type"].startswith("text/event-stream")
        current: dict[str, Any] = {}
        for line in r.iter_lines(decode_unicode=True):
            if line == "":
                if "event" in current:
                    out.append({"id": current.get("id"), "event": current["event"],
                                "data": json.loads(current["data"])})
                    if stop_after is not None and len(out) >= stop_after:
                        return r.status_code, out
                current = {}
            elif not line.startswith(":"):
                field, _, value = line.partition(": ")
                current[field] = value
    return 200, out


def test_a_task_streams_started_progress_and_its_final_status(stack: Stack) -> None:
    task_id = stack.submit({"prompt": "a red circle", "seed": 3, "steps": 12})
    status, events = read_events(stack, task_id)
    assert status == 200
    names = [e["event"] for e in events]
    assert names[-1] == "succeeded"
    assert "started" in names and names.index("started") < names.index("progress")
    assert set(names) <= {"queued", "started", "progress", "succeeded"}
    assert names.count("succeeded") == 1
    steps = [e["data"]["step"] for e in events if e["event"] == "progress"]
    assert steps == sorted(steps) and all(e["data"]["total"] == 12 for e in events
                                          if e["event"] == "progress")
    ids = [e["id"] for e in events if e["id"] is not None]
    assert len(ids) == len(set(ids)) == len([e for e in events if e["event"] != "queued"])
    final = events[-1]["data"]
    got = requests.get(f"{stack.base}/api/v1/tasks/{task_id}", headers=stack.headers, timeout=5).json()
    assert final == got and final["state"] == "SUCCESS"


def test_reconnecting_with_last_event_id_gets_the_rest_once(stack: Stack) -> None:
    task_id = stack.submit({"prompt": "a blue square", "seed": 4, "steps": 30})
    _, first = read_events(stack, task_id, stop_after=3)
    with_ids = [e for e in first if e["id"]]
    assert with_ids, first
    _, rest = read_events(stack, task_id, last_id=with_ids[-1]["id"])
    assert rest[-1]["event"] == "succeeded"
    _, whole = read_events(stack, task_id)  # after the end: every entry from the start
    got = [e["id"] for e in with_ids] + [e["id"] for e in rest if e["id"]]
    assert got == [e["id"] for e in whole if e["id"]]
    assert len(got) == len(set(got))
    # The client already has the final event: 204, nothing more comes.
    status, after_end = read_events(stack, task_id, last_id=rest[-1]["id"])
    assert status == 204 and after_end == []


def test_another_keys_stream_is_404_like_get(stack: Stack) -> None:
    task_id = stack.submit({"prompt": "a green line", "seed": 5, "steps": 4})
    status, _ = read_events(stack, task_id, key=OTHER_KEY)
    get = requests.get(f"{stack.base}/api/v1/tasks/{task_id}", headers={"X-API-Key": OTHER_KEY},
                       timeout=5)
    assert status == get.status_code == 404
    assert read_events(stack, "not-a-task")[0] == 404
    r = requests.get(f"{stack.base}/api/v1/tasks/{task_id}/events", timeout=5)
    assert r.status_code == 401


def test_a_revoked_task_ends_with_revoked(stack: Stack) -> None:
    # A long request, revoked while it runs.
    task_id = stack.submit({"prompt": "a yellow star", "seed": 6, "steps": 100})
    _, head = read_events(stack, task_id, stop_after=2)
    assert requests.delete(f"{stack.base}/api/v1/tasks/{task_id}", headers=stack.headers,
                           timeout=5).status_code == 202
    _, rest = read_events(stack, task_id, last_id=[e for e in head if e["id"]][-1]["id"])
    assert rest[-1]["event"] == "revoked" and rest[-1]["data"]["state"] == "REVOKED"


def test_the_client_follows_the_stream(stack: Stack) -> None:
    client = Client(stack.base, API_KEY)
    task_id = client.submit("a circle", seed=7, steps=10).task_id
    seen = list(client.events(task_id))
    assert seen[-1].event == "succeeded" and seen[-1].status is not None
    assert seen[-1].status.state == "SUCCESS"
    assert any(e.event == "progress" for e in seen)
    result = client.wait(client.submit("a square", seed=8, steps=5).task_id, timeout=60)
    assert result.images


# -- callback_events ---------------------------------------------------------------

@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver([])
    yield r
    r.close()


def hooks(receiver: Receiver, n_completed: int = 1, timeout: float = 30) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        bodies = [json.loads(s["body"]) | {"_delivery": s["headers"]["X-ImageGenX-Delivery"]}
                  for s in receiver.seen]
        if sum(b["event"] == "completed" for b in bodies) >= n_completed:
            time.sleep(0.5)  # any late progress delivery
            return [json.loads(s["body"]) | {"_delivery": s["headers"]["X-ImageGenX-Delivery"]}
                    for s in receiver.seen]
        time.sleep(0.05)
    raise TimeoutError(f"webhooks: {receiver.seen}")


def test_webhooks_for_the_events_asked_for(stack: Stack, receiver: Receiver) -> None:
    url = f"http://127.0.0.1:{receiver.port}/hook"
    task_id = stack.submit({"prompt": "a hook", "seed": 9, "steps": 100, "callback_url": url,
                            "callback_events": ["started", "progress", "completed"]})
    wait_task(stack.base, task_id, API_KEY, 60)
    got = hooks(receiver)
    events = [b["event"] for b in got]
    assert events.count("started") == 1 and events.count("completed") == 1
    assert events.count("progress") >= 1
    started = next(b for b in got if b["event"] == "started")
    assert started["state"] == "STARTED" and started["_delivery"] == f"{task_id}:started:0"
    progress = [b for b in got if b["event"] == "progress"]
    for b in progress:
        assert b["state"] == "PROGRESS" and b["progress"]["total"] == 100
        assert b["_delivery"] == f"{task_id}:progress:{b['progress']['step']}"
    completed = next(b for b in got if b["event"] == "completed")
    assert completed["state"] == "SUCCESS" and completed["_delivery"] == task_id
    assert len({b["_delivery"] for b in got}) == len(got)
    # The completion's record is the task's webhook field, as before.
    body = requests.get(f"{stack.base}/api/v1/tasks/{task_id}", headers=stack.headers, timeout=5).json()
    assert body["webhook"]["state"] in ("queued", "retrying", "delivered")


def test_only_the_completion_by_default(stack: Stack, receiver: Receiver) -> None:
    url = f"http://127.0.0.1:{receiver.port}/hook"
    task_id = stack.submit({"prompt": "a default hook", "seed": 10, "steps": 40, "callback_url": url})
    wait_task(stack.base, task_id, API_KEY, 60)
    got = hooks(receiver)
    assert [(b["event"], b["_delivery"]) for b in got] == [("completed", task_id)]


def test_unknown_callback_event_is_422_naming_the_field(stack: Stack) -> None:
    r = requests.post(f"{stack.base}/api/v1/images", headers=stack.headers, timeout=5,
                      json={"prompt": "x", "callback_events": ["completed", "finished"]})
    assert r.status_code == 422
    (err,) = r.json()["fields"]
    assert err["field"] == "callback_events.1" and "started" in err["reason"]
    r = requests.post(f"{stack.base}/api/v1/images", headers=stack.headers, timeout=5,
                      json={"prompt": "x", "callback_events": ["started", "started"]})
    assert r.status_code == 422
    assert r.json()["fields"] == [{"field": "callback_events", "reason": "an event is named twice"}]


# -- an API with no worker: requests stay in the queue ------------------------------

@pytest.fixture(scope="module")
def api_only(redis_base: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    from imagegenx.api import create_app
    from imagegenx.redis_client import redis_client
    from tasks import create_celery_app
    from tests.integration.stack import settings_from_env, stack_env
    from tests.service import ApiServer, drop_queues, free_port

    port = free_port()
    env = stack_env(redis_base, tmp_path_factory.mktemp("events-queued"), None, port,
                    IMAGEGENX_ENGINE="synthetic", IMAGEGENX_EVENTS_POLL_S="0.2",
                    IMAGEGENX_WORKERS_INSPECT_TIMEOUT_S="0.2")
    settings = settings_from_env(env)
    celery = create_celery_app(settings)
    try:
        with ApiServer(create_app(settings, celery), port) as api:
            yield Stack(settings, env, api, None, celery, tmp_path_factory.mktemp("unused"))  # type: ignore[arg-type]
    finally:
        drop_queues(redis_client(settings.broker_url, settings.sentinel_master), settings)


def test_a_queued_task_hears_its_place_and_a_revoke_ends_its_stream(api_only: Stack) -> None:
    ids = [api_only.submit({"prompt": f"queued {i}", "seed": i, "steps": 10}) for i in range(3)]
    _, (queued,) = read_events(api_only, ids[2], stop_after=1)
    assert queued["event"] == "queued" and queued["id"] is None
    assert queued["data"]["position"] == 3 and queued["data"]["queue_depth"] == 3
    assert queued["data"]["where"] == "queue"
    # Workers on the same broker (other tests' too) answer the throughput question.
    assert queued["data"]["estimate_s"] is None or queued["data"]["estimate_s"] > 0
    _, (first,) = read_events(api_only, ids[0], stop_after=1)
    assert first["data"]["position"] == 1
    # Revoked while queued: no worker writes an entry; the stream reads the state.
    assert requests.delete(f"{api_only.base}/api/v1/tasks/{ids[1]}", headers=api_only.headers,
                           timeout=5).status_code == 202
    _, events = read_events(api_only, ids[1])
    assert events[-1]["event"] == "revoked" and events[-1]["data"]["state"] == "REVOKED"
    assert events[-1]["id"] is not None
    status, rest = read_events(api_only, ids[1], last_id=events[-1]["id"])
    assert status == 204 and rest == []
