"""Pure parts of task event streams and webhook events: formatting, resume ids,
splitting previews off progress, the client's parser, the progress throttle;
and the event log against the real Redis (resume reads exactly the rest)."""
from __future__ import annotations

import json
import uuid

import pytest

from imagegenx import task_events, webhook_events
from imagegenx.client import parse_sse
from imagegenx.redis_client import redis_client


def test_an_event_is_id_event_and_one_line_of_json() -> None:
    text = task_events.format_event("progress", {"step": 3, "total": 20}, "17-0")
    assert text == 'id: 17-0\nevent: progress\ndata: {"step":3,"total":20}\n\n'
    assert task_events.format_event("queued", {"position": 2}) == \
        'event: queued\ndata: {"position":2}\n\n'
    assert task_events.format_comment("keep-alive") == ": keep-alive\n\n"
    assert task_events.format_retry(2000) == "retry: 2000\n\n"


def test_data_with_newlines_stays_on_one_data_line() -> None:
    text = task_events.format_event("failed", {"message": "a\nb"}, "1-0")
    assert text.count("\n") == 4 and "\\n" in text


def test_the_client_parses_what_the_server_formats() -> None:
    body = (task_events.format_retry(2000) + task_events.format_event("queued", {"position": 1})
            + task_events.format_comment("keep-alive")
            + task_events.format_event("progress", {"step": 1, "total": 2}, "5-1"))
    events = list(parse_sse(body.split("\n")))
    assert [(e.event, e.id, e.data) for e in events] == [
        ("queued", None, {"position": 1}), ("progress", "5-1", {"step": 1, "total": 2})]
    assert events[0].status is None


@pytest.mark.parametrize("sent, after", [
    (None, "0-0"), ("", "0-0"), ("garbage", "0-0"), ("12", "0-0"), ("1-2-3", "0-0"),
    ("1700000000000-3", "1700000000000-3"), (" 5-0 ", "5-0"), ("0-0", "0-0"),
])
def test_resume_reads_after_a_valid_id_else_from_the_start(sent: str | None, after: str) -> None:
    assert task_events.resume_after(sent) == after


def test_ids_compare_as_stream_ids_not_as_text() -> None:
    assert task_events.id_after("10-0", "9-5")
    assert task_events.id_after("9-10", "9-9")
    assert not task_events.id_after("9-9", "9-10")
    assert not task_events.id_after("x", "1-0")


def test_a_preview_becomes_its_own_event_and_stays_out_of_progress() -> None:
    preview = {"step": 4, "width": 8, "height": 8, "png_base64": "iVBORw0KGgo="}
    events = task_events.split_progress({"step": 4, "total": 20, "preview": preview})
    assert events == [("progress", {"step": 4, "total": 20}), ("preview", preview)]
    assert task_events.split_progress({"step": 1, "total": 2}) == [
        ("progress", {"step": 1, "total": 2})]


def test_terminal_events_map_to_the_task_states() -> None:
    assert task_events.STATE_EVENT == {"SUCCESS": "succeeded", "FAILURE": "failed",
                                       "REVOKED": "revoked"}
    entry = task_events.entries([(b"1-0", {b"event": b"succeeded", b"data": b'{"state":"SUCCESS"}'})])
    assert entry == [task_events.Entry("1-0", "succeeded", {"state": "SUCCESS"})]
    assert entry[0].terminal


def test_the_event_log_resumes_after_an_id_with_nothing_twice(redis_base: str) -> None:
    client = redis_client(f"{redis_base}/5")
    log = task_events.EventLog(client, ttl_s=60, maxlen=100)
    task = f"unit-{uuid.uuid4()}"
    try:
        ids = log.append(task, [("started", {}), ("progress", {"step": 1, "total": 3}),
                                ("progress", {"step": 2, "total": 3})])
        assert 0 < client.ttl(log.key(task)) <= 60
        ids += log.append(task, [("succeeded", {"state": "SUCCESS"})])
        assert 0 < client.ttl(log.key(task)) <= 60
        whole = log.read(task, "0-0")
        assert [e.id for e in whole] == ids
        rest = log.read(task, ids[1])
        assert [e.event for e in rest] == ["progress", "succeeded"] and rest[0].id == ids[2]
        assert log.read(task, ids[-1], block_ms=10) == []
        assert not log.terminal_at_or_before(task, ids[2])
        assert log.terminal_at_or_before(task, ids[3])
    finally:
        client.delete(log.key(task))


def test_a_finished_stream_is_kept_an_hour_not_the_results_lifetime(redis_base: str) -> None:
    client = redis_client(f"{redis_base}/5")
    log = task_events.EventLog(client, ttl_s=86400)
    task = f"unit-{uuid.uuid4()}"
    try:
        log.append(task, [("progress", {"step": 1, "total": 2})])
        assert client.ttl(log.key(task)) > task_events.FINISHED_TTL_S
        log.append(task, [("failed", {"state": "FAILURE"})])
        assert 0 < client.ttl(log.key(task)) <= task_events.FINISHED_TTL_S
    finally:
        client.delete(log.key(task))


def test_progress_webhooks_are_throttled_per_task() -> None:
    throttle = webhook_events.ProgressThrottle(0.5)
    assert throttle.due("a", 10.0)
    assert not throttle.due("a", 10.4)
    assert throttle.due("b", 10.4)  # another task has its own clock
    assert throttle.due("a", 10.5)
    assert not throttle.due("a", 10.9)
    throttle.forget("a")
    assert throttle.due("a", 10.9)


def test_callback_events_choose_and_name_deliveries() -> None:
    assert webhook_events.wanted(None, "completed")
    assert not webhook_events.wanted(None, "progress")
    assert not webhook_events.wanted(["started"], "completed")
    assert webhook_events.wanted(["started", "progress"], "progress")
    assert webhook_events.delivery_id("t", "completed") == "t"
    assert webhook_events.delivery_id("t", "started") == "t:started:0"
    assert webhook_events.delivery_id("t", "progress", 7) == "t:progress:7"


def test_webhook_payload_names_its_event() -> None:
    from imagegenx.webhooks import payload

    body = payload("t", "PROGRESS", event="progress", progress={"step": 1, "total": 2})
    assert json.loads(json.dumps(body)) == {"task_id": "t", "event": "progress", "state": "PROGRESS",
                                            "progress": {"step": 1, "total": 2}, "result": None,
                                            "error": None}
    assert payload("t", "SUCCESS", {"images": []})["event"] == "completed"


def _message(task_id: str, steps: int, images: int = 1) -> bytes:
    import base64

    body = base64.b64encode(json.dumps([[], {"steps": steps, "num_images": images}, {}]).encode())
    return json.dumps({"body": body.decode(), "headers": {"id": task_id},
                       "properties": {"body_encoding": "base64"}}).encode()


def test_queue_place_follows_the_order_workers_take_messages() -> None:
    from imagegenx.api.task_stream import place, queue_order

    # kombu LPUSHes: the oldest message is at the tail of each list; lists in priority order.
    first = [_message("c", 30), _message("b", 20), _message("a", 10, images=2)]
    second = [_message("d", 40)]
    order = queue_order([first, second])
    assert [t for t, _ in order] == ["a", "b", "c", "d"]
    assert place(order, "a") == (1, 20.0)
    assert place(order, "c") == (3, (20 + 20 + 30) / 3)
    assert place(order, "d") == (4, (20 + 20 + 30 + 40) / 4)
    assert place(order, "missing") == (None, None)
    assert queue_order([[b"not json"]]) == []


def test_the_openapi_document_describes_the_event_stream() -> None:
    from openapi_spec_validator import validate

    from imagegenx.api.openapi import build_spec
    from imagegenx.schemas import Limits

    spec = build_spec(Limits())
    validate(spec)
    op = spec["paths"]["/api/v1/tasks/{task_id}/events"]["get"]
    assert "text/event-stream" in op["responses"]["200"]["content"]
    assert {"204", "401", "404"} <= set(op["responses"])
    assert set(op["x-events"]) == set(task_events.EVENTS)
    events = spec["components"]["schemas"]["GenerateRequest"]["properties"]["callback_events"]
    assert events["items"]["enum"] == ["started", "progress", "completed"]


def test_many_tasks_are_appended_in_one_round_trip_in_order(redis_base: str) -> None:
    client = redis_client(f"{redis_base}/5")
    log = task_events.EventLog(client, ttl_s=60)
    a, b = f"unit-{uuid.uuid4()}", f"unit-{uuid.uuid4()}"
    try:
        ids = log.append_many([(a, [("progress", {"step": 1, "total": 2}),
                                    ("preview", {"step": 1, "width": 1, "height": 1, "png_base64": ""})]),
                               (b, [("succeeded", {"state": "SUCCESS"})])])
        assert [len(x) for x in ids] == [2, 1]
        assert [e.event for e in log.read(a, "0-0")] == ["progress", "preview"]
        assert [e.id for e in log.read(b, "0-0")] == ids[1]
        assert client.ttl(log.key(b)) <= 60
    finally:
        client.delete(log.key(a), log.key(b))
