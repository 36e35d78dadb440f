"""Which events a request's ``callback_url`` receives (``callback_events``), and
how often: pure rules, used by the worker.

As Cog's ``webhook_events_filter``: ``started``, ``progress`` and ``completed``
(the default, alone). Progress webhooks of one task go out at most once per
``PROGRESS_INTERVAL_S``. Every delivery has its own id, ``<task id>`` for the
completion (as before events were chosen) and ``<task id>:<event>:<sequence>``
for the others (sequence: 0 for ``started``, the step for ``progress``), so a
retried delivery keeps its id and a receiver can deduplicate on it.
"""
from __future__ import annotations

import threading
from typing import Literal

CallbackEvent = Literal["started", "progress", "completed"]
CALLBACK_EVENTS: tuple[str, ...] = ("started", "progress", "completed")
DEFAULT_EVENTS: tuple[str, ...] = ("completed",)
PROGRESS_INTERVAL_S = 0.5


def wanted(callback_events: list[str] | tuple[str, ...] | None, event: str) -> bool:
    """Whether a request asked for ``event`` (None: the default, completion only)."""
    return event in (DEFAULT_EVENTS if callback_events is None else callback_events)


def delivery_id(task_id: str, event: str, sequence: int = 0) -> str:
    """The delivery's id (``X-ImageGenX-Delivery``, and its record's key)."""
    return task_id if event == "completed" else f"{task_id}:{event}:{sequence}"


class ProgressThrottle:
    """At most one progress webhook per task every ``interval_s`` (clock passed in)."""

    def __init__(self, interval_s: float = PROGRESS_INTERVAL_S) -> None:
        self.interval_s = interval_s
        self._last: dict[str, float] = {}
        self._lock = threading.Lock()

    def due(self, task_id: str, now: float) -> bool:
        """True (and the time noted) when the task's last progress webhook is old enough."""
        with self._lock:
            last = self._last.get(task_id)
            if last is not None and now - last < self.interval_s:
                return False
            self._last[task_id] = now
            return True

    def forget(self, task_id: str) -> None:
        """The task ended: drop its entry."""
        with self._lock:
            self._last.pop(task_id, None)
