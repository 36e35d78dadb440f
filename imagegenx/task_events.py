"""A task's life as a list of events, for ``GET /api/v1/tasks/<id>/events``.

The worker appends ``started``, ``progress``, ``preview`` and a terminal
``succeeded`` / ``failed`` / ``revoked`` to a per-task Redis Stream
(``imagegenx:events:<task id>``, capped with MAXLEN, expiring with the
results). The stream's entry ids are the server-sent events' ids, so a client
that reconnects with ``Last-Event-ID`` reads on from where it stopped: Redis
gives exactly the entries after that id, none twice.

The terminal entry is only a marker: the API sends the task's status (what
``GET /api/v1/tasks/<id>`` returns) as that event's data. The progress data the
worker stores may carry a ``preview`` (step, width, height, png_base64); it is
split off into its own ``preview`` event so progress events stay small.

Pure parts (formatting, ids, splitting) are apart from the Redis I/O
(:class:`EventLog`), which never raises into the worker's path.
"""
from __future__ import annotations

import json
import logging
import re
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import redis

log = logging.getLogger(__name__)

STREAM_PREFIX = "imagegenx:events:"
# Events a stream keeps at most (Redis trims the oldest, approximately).
MAXLEN = 1000
# Once the final entry is written the stream is kept this long (at most the results'
# lifetime): previews are not held for a day. A client that resumes later than that
# still gets the final event, read from the result backend.
FINISHED_TTL_S = 3600
TERMINAL = {"succeeded": "SUCCESS", "failed": "FAILURE", "revoked": "REVOKED"}
STATE_EVENT = {state: event for event, state in TERMINAL.items()}
EVENTS = ("queued", "started", "progress", "preview", *TERMINAL)
_ID = re.compile(r"^(\d{1,20})-(\d{1,20})$")


# -- pure ----------------------------------------------------------------------

def format_event(event: str, data: Any, event_id: str | None = None) -> str:
    """One server-sent event: ``id``, ``event`` and one ``data`` line of compact JSON."""
    lines = [] if event_id is None else [f"id: {event_id}"]
    lines += [f"event: {event}", "data: " + json.dumps(data, separators=(",", ":"))]
    return "\n".join(lines) + "\n\n"


def format_comment(text: str) -> str:
    """A comment line: clients ignore it; it keeps proxies from closing an idle stream."""
    return f": {text}\n\n"


def format_retry(ms: int) -> str:
    """How long a client waits before it reconnects."""
    return f"retry: {int(ms)}\n\n"


def parse_id(value: str | None) -> tuple[int, int] | None:
    """A stream entry id (``<ms>-<seq>``) as a tuple, or None when it is not one."""
    m = _ID.match((value or "").strip())
    return (int(m.group(1)), int(m.group(2))) if m else None


def resume_after(last_event_id: str | None) -> str:
    """Where to read on: after the client's last id, or from the start ("0-0")
    when it sent none or something that is not an id of ours."""
    parsed = parse_id(last_event_id)
    return "0-0" if parsed is None else f"{parsed[0]}-{parsed[1]}"


def id_after(a: str, b: str) -> bool:
    """Whether stream id ``a`` comes after ``b``."""
    pa, pb = parse_id(a), parse_id(b)
    return pa is not None and pb is not None and pa > pb


def split_progress(data: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The events one progress store makes: ``progress`` (step, total) and,
    when the data carries one, ``preview`` (its own event: the PNG stays out of
    the progress event)."""
    events: list[tuple[str, dict[str, Any]]] = [
        ("progress", {"step": data.get("step"), "total": data.get("total")})]
    preview = data.get("preview")
    if isinstance(preview, dict):
        events.append(("preview", dict(preview)))
    return events


def decode_entry(fields: dict[Any, Any]) -> tuple[str, dict[str, Any]]:
    """(event, data) of a stream entry (its fields ``event`` and ``data``)."""
    def text(v: Any) -> str:
        return v.decode() if isinstance(v, bytes) else str(v)

    raw = {text(k): text(v) for k, v in fields.items()}
    try:
        data = json.loads(raw.get("data", "{}"))
    except ValueError:
        data = {}
    return raw.get("event", ""), data if isinstance(data, dict) else {"value": data}


@dataclass(frozen=True)
class Entry:
    id: str
    event: str
    data: dict[str, Any]

    @property
    def terminal(self) -> bool:
        return self.event in TERMINAL


def entries(reply: Iterable[tuple[Any, dict[Any, Any]]]) -> list[Entry]:
    """Stream entries as :class:`Entry` records (ids as text)."""
    out = []
    for entry_id, fields in reply:
        event, data = decode_entry(fields)
        out.append(Entry(entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id),
                         event, data))
    return out


# -- Redis I/O -------------------------------------------------------------------

class EventLog:
    """Append to and read a task's event stream."""

    def __init__(self, client: redis.Redis, ttl_s: int, maxlen: int = MAXLEN) -> None:
        self.client = client
        self.ttl_s = ttl_s
        self.maxlen = maxlen
        self._warned = False

    @staticmethod
    def key(task_id: str) -> str:
        return STREAM_PREFIX + task_id

    def append(self, task_id: str, events: list[tuple[str, dict[str, Any]]]) -> list[str]:
        """Append events in order (raises RedisError); their ids."""
        return self.append_many([(task_id, events)])[0]

    def append_many(self, batch: list[tuple[str, list[tuple[str, dict[str, Any]]]]]
                    ) -> list[list[str]]:
        """Append each task's events in one round trip (the worker's model thread
        reports many requests at once); the ids per task."""
        pipe = self.client.pipeline(transaction=False)
        for task_id, events in batch:
            key = self.key(task_id)
            for event, data in events:
                pipe.xadd(key, {"event": event, "data": json.dumps(data, separators=(",", ":"))},
                          maxlen=self.maxlen, approximate=True)
            ended = any(event in TERMINAL for event, _ in events)
            pipe.expire(key, min(self.ttl_s, FINISHED_TTL_S) if ended else self.ttl_s)
        replies = iter(pipe.execute())
        out = []
        for _, events in batch:
            ids = [next(replies) for _ in events]
            next(replies)  # EXPIRE
            out.append([r.decode() if isinstance(r, bytes) else str(r) for r in ids])
        return out

    def publish(self, task_id: str, event: str, data: dict[str, Any] | None = None) -> None:
        """Append one event for watchers; a Redis outage only logs (once)."""
        self.publish_many(task_id, [(event, data or {})])

    def publish_many(self, task_id: str, events: list[tuple[str, dict[str, Any]]]) -> None:
        self.publish_batch([(task_id, events)])

    def publish_batch(self, batch: list[tuple[str, list[tuple[str, dict[str, Any]]]]]) -> None:
        """Append for watchers (one round trip); a Redis outage only logs (once)."""
        if not batch:
            return
        try:
            self.append_many(batch)
            self._warned = False
        except Exception as exc:  # noqa: BLE001 - events are for watchers only
            if not self._warned:
                log.warning("could not publish events of %s: %r", batch[0][0], exc)
                self._warned = True

    def read(self, task_id: str, after: str, block_ms: int | None = None,
             count: int = 100) -> list[Entry]:
        """Entries after id ``after``, waiting up to ``block_ms`` for one (raises RedisError)."""
        reply = self.client.xread({self.key(task_id): after}, count=count, block=block_ms)
        return [e for _, stream in reply or [] for e in entries(stream)]

    def terminal_at_or_before(self, task_id: str, last: str) -> bool:
        """Whether the stream's terminal event is at or before id ``last`` (the
        client already has it)."""
        for e in entries(self.client.xrange(self.key(task_id), "-", last)):
            if e.terminal:
                return True
        return False


_clients: dict[tuple[str, float], redis.Redis] = {}
_lock = threading.Lock()


def event_log(settings: Any, socket_timeout_s: float = 5.0) -> EventLog:
    """The event log on the broker's Redis (one client per URL and timeout)."""
    from imagegenx.redis_client import redis_client

    key = (settings.broker_url, socket_timeout_s)
    with _lock:
        client = _clients.get(key)
        if client is None:
            client = redis_client(settings.broker_url, settings.sentinel_master,
                                  socket_connect_timeout=2, socket_timeout=socket_timeout_s,
                                  health_check_interval=10)
            _clients[key] = client
    return EventLog(client, settings.result_expires_s)
