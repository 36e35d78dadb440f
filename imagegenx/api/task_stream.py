"""GET /api/v1/tasks/<id>/events: the task's life as server-sent events.

``queued`` (position and estimated wait, while it waits), ``started``,
``progress``, ``preview`` and one final ``succeeded`` / ``failed`` /
``revoked`` whose data is what ``GET /api/v1/tasks/<id>`` answers; then the
stream closes. Events with an ``id`` come from the task's Redis Stream
(``imagegenx.task_events``): a client that reconnects with ``Last-Event-ID``
gets exactly the entries after it; one that already had the final event gets
204 (which tells a browser's EventSource to stop reconnecting). ``queued`` has
no id: it is recomputed on every connection.

Under gunicorn's gevent workers a stream is one greenlet waiting in a Redis
``XREAD BLOCK`` on a patched socket: open streams hold no thread and do not
stall other requests. Every ``events_poll_s`` the stream also reads the task's
state in the result backend, so a task that ended without its final entry (an
invalid message, a revoke before it ran, a stream that expired) still gets its
final event.
"""
from __future__ import annotations

import logging
import random
import re
import threading
import time
from collections.abc import Iterator
from typing import Any

from celery import states
from celery.exceptions import BackendError
from celery.result import AsyncResult
from flask import Response, request
from redis.exceptions import RedisError

from pydantic import BaseModel, Field

from imagegenx import scaling, task_events
from imagegenx.api.errors import ApiError
from imagegenx.api.guards import require_key
from imagegenx.api.metrics import queue_keys
from imagegenx.api.services import Services, services
# The tasks blueprint: the stream shares the task reads' rate limit.
from imagegenx.api.task_status import _owned, bp, status_body

log = logging.getLogger(__name__)

# Waiting messages scanned (oldest first) to find a task's place in the queue.
QUEUE_SCAN = 1000
QUEUE_CHECK_S = 2.0
RATE_CACHE_S = 30.0
RETRY_MS = 2000
WAITING = (states.PENDING, "RECEIVED")


# -- what the events carry (for the OpenAPI document) ------------------------------

class QueuedEvent(BaseModel):
    """``queued``: the task waits (no id: recomputed on every connection)."""

    state: str = Field(description="PENDING (in the queue) or RECEIVED (held by a worker)")
    position: int | None = Field(description="1-based place in the order workers take messages; "
                                             "null when a worker holds it or it was not found")
    queue_depth: int | None = Field(description="messages waiting in the queue")
    estimate_s: float | None = Field(description="image-steps of it and those ahead / the live "
                                                 "workers' measured image-steps per second")
    where: str = Field(description="queue, worker or unknown")


class StartedEvent(BaseModel):
    hostname: str | None = None
    pid: int | None = None


class PreviewEvent(BaseModel):
    step: int
    width: int
    height: int
    png_base64: str = Field(description="a small PNG of the image at this step")


# -- queue position (Redis I/O over imagegenx.scaling's arithmetic) --------------

_TASK_ID = re.compile(rb'"id": ?"([^"]{1,155})"')


def queue_order(lists: list[list[bytes]],
                known: dict[str, int | None] | None = None) -> list[tuple[str, int | None]]:
    """(task id, image steps) of the waiting messages in the order kombu serves them:
    its priority lists in order, each oldest first (kombu LPUSHes and BRPOPs).

    The id is found without decoding the message (its ``"id"`` header); a message's
    body is decoded only for an id not in ``known`` (image steps never change), so
    a reading costs little CPU: under gevent, CPU work holds every greenlet of the
    process."""
    known = {} if known is None else known
    out: list[tuple[str, int | None]] = []
    for lst in lists:
        for raw in reversed(lst):
            m = _TASK_ID.search(raw)
            if m is None:
                continue
            task_id = m.group(1).decode(errors="replace")
            if task_id not in known:
                known[task_id] = scaling.image_steps(raw)
                if len(known) % 50 == 0:
                    time.sleep(0)  # let other greenlets run (a no-op without gevent)
            out.append((task_id, known[task_id]))
    return out


def place(order: list[tuple[str, int | None]], task_id: str) -> tuple[int | None, float | None]:
    """(1-based place in the queue or None, mean image steps of it and those ahead)."""
    for i, (tid, _) in enumerate(order):
        if tid == task_id:
            steps = [s for _, s in order[:i + 1] if s is not None]
            return i + 1, (sum(steps) / len(steps) if steps else None)
    return None, None


class _QueueView:
    """One queue's waiting messages and the throughput of the workers consuming it,
    read at most every QUEUE_CHECK_S per API process and shared by all its streams
    (one reader at a time; the others use the last reading): 200 queued streams
    cost one scan. Each served model has its own queue (``<queue>.<model>``), so
    each gets its own view."""

    def __init__(self, queue: str) -> None:
        self.queue = queue
        self.order: list[tuple[str, int | None]] = []
        self.steps: dict[str, int | None] = {}  # image steps of each message read
        self.depth = 0
        self.at = float("-inf")
        self.rate: float | None = None
        self.rate_at = float("-inf")
        self.lock = threading.Lock()

    def read(self, svc: Services) -> "_QueueView":
        now = time.monotonic()
        if now - self.at < QUEUE_CHECK_S or not self.lock.acquire(blocking=False):
            return self
        try:
            keys = queue_keys(self.queue)
            pipe = svc.redis.pipeline(transaction=False)
            for key in keys:
                pipe.llen(key)
                pipe.lrange(key, -QUEUE_SCAN, -1)
            replies = pipe.execute()
            self.depth = int(sum(replies[0::2]))
            self.order = queue_order(replies[1::2], self.steps)
            live = {tid for tid, _ in self.order}
            self.steps = {tid: n for tid, n in self.steps.items() if tid in live}
            if now - self.rate_at >= RATE_CACHE_S:
                self.rate, self.rate_at = _worker_rate(svc, self.queue), now
        finally:
            self.at = time.monotonic()
            self.lock.release()
        return self


def queue_rate(replies: list[dict[str, Any]], queue: str) -> float | None:
    """Image-steps per second of the workers (``batching`` control replies) that
    consume ``queue``; a reply that does not say what it consumes counts."""
    rates = [scaling.throughput(body) for reply in replies for body in reply.values()
             if isinstance(body, dict) and queue in body.get("consuming", [queue])]
    total = sum(r for r in rates if r)
    return total if total > 0 else None


def _worker_rate(svc: Services, queue: str) -> float | None:
    """The image-steps per second of the live workers of ``queue`` (None when none
    has measured it)."""
    try:
        replies = svc.celery.control.broadcast(
            "batching", reply=True, timeout=svc.settings.workers_inspect_timeout_s) or []
    except Exception as exc:  # noqa: BLE001 - no estimate, the stream goes on
        log.warning("could not ask the workers for their throughput: %r", exc)
        return None
    return queue_rate(replies, queue)


_views: dict[tuple[int, str], _QueueView] = {}


def queued_data(svc: Services, task_id: str, state: str) -> dict[str, Any]:
    """The ``queued`` event: place in its model's queue, that queue's depth and the
    estimated wait at the pace of the workers serving it."""
    if state != states.PENDING:  # RECEIVED: a worker holds it until a row is free
        return {"state": state, "position": None, "queue_depth": None, "estimate_s": None,
                "where": "worker"}
    for queue in dict.fromkeys(svc.settings.generation_queues.values()):
        view = _views.setdefault((id(svc), queue), _QueueView(queue)).read(svc)
        position, mean = place(view.order, task_id)
        if position is not None:
            estimate = scaling.drain_s(position, mean, view.rate or 0.0)
            return {"state": state, "position": position, "queue_depth": view.depth,
                    "estimate_s": estimate, "where": "queue"}
    return {"state": state, "position": None, "queue_depth": None, "estimate_s": None,
            "where": "unknown"}


# -- the stream ------------------------------------------------------------------

def stream(svc: Services, result: AsyncResult, after: str) -> Iterator[str]:
    """The server-sent events of one connection, from stream id ``after`` on."""
    settings = svc.settings
    poll_ms = int(settings.events_poll_s * 1500)
    events = task_events.event_log(settings, socket_timeout_s=settings.events_poll_s * 1.5 + 5)
    task_id = result.id
    end = time.monotonic() + settings.events_max_stream_s
    quiet_since = time.monotonic()
    last_queued: tuple[Any, ...] | None = None
    queue_check = next_check = float("-inf")
    yield task_events.format_retry(RETRY_MS)

    def final(entry_id: str, event: str) -> str:
        return task_events.format_event(event, status_body(svc, result), entry_id)

    try:
        while True:
            now = time.monotonic()
            if now >= next_check:
                # Jittered: streams opened together do not all wake together.
                next_check = now + settings.events_poll_s * random.uniform(0.5, 1.5)
                state = result.backend.get_task_meta(task_id, cache=False)["status"]
                if state in states.READY_STATES:
                    # Entries the worker wrote before: in order, then the final one.
                    for e in events.read(task_id, after):
                        if e.terminal:
                            yield final(e.id, e.event)
                            return
                        yield task_events.format_event(e.event, e.data, e.id)
                    event = task_events.STATE_EVENT.get(state, "failed")
                    (entry_id,) = events.append(task_id, [(event, {"state": state})])
                    yield final(entry_id, event)
                    return
                if state in WAITING and now - queue_check >= QUEUE_CHECK_S:
                    queue_check = now
                    data = queued_data(svc, task_id, state)
                    key = (data["state"], data["position"], data["estimate_s"])
                    if key != last_queued:
                        last_queued = key
                        yield task_events.format_event("queued", data)
                        quiet_since = now
                if now - quiet_since >= settings.events_heartbeat_s:
                    yield task_events.format_comment("keep-alive")
                    quiet_since = now
                if now >= end:
                    return  # the client reconnects with Last-Event-ID
            wait_ms = max(1, min(poll_ms, int((next_check - time.monotonic()) * 1000)))
            for e in events.read(task_id, after, block_ms=wait_ms):
                after = e.id
                if e.terminal:
                    yield final(e.id, e.event)
                    return
                yield task_events.format_event(e.event, e.data, e.id)
                quiet_since = time.monotonic()
    except (RedisError, BackendError, ConnectionError) as exc:
        log.warning("event stream of %s ended: %r", task_id, exc)
        yield task_events.format_comment(f"unavailable: {type(exc).__name__}")


@bp.get("/tasks/<task_id>/events")
def task_event_stream(task_id: str):  # type: ignore[no-untyped-def]
    svc = services()
    result = _owned(svc, task_id, require_key())
    after = task_events.resume_after(request.headers.get("Last-Event-ID")
                                     or request.args.get("last_event_id"))
    retry = {"Retry-After": str(svc.settings.retry_after_s)}
    try:
        if after != "0-0" and task_events.event_log(svc.settings).terminal_at_or_before(task_id, after):
            return Response(status=204)  # it has the final event: nothing more will come
    except RedisError as exc:
        raise ApiError(503, "event stream unavailable", headers=retry) from exc
    return Response(stream(svc, result, after), mimetype="text/event-stream",
                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
