"""Keeps the messages a live worker holds from reaching the visibility timeout.

Redis records each unacknowledged message with its delivery time (a sorted
set, ``unacked_index``); a live worker's periodic sweep puts back in the queue
every message older than the visibility timeout, since its worker is presumed
lost. A batching worker holds messages while they wait in its buffer and while
their batch runs; when its batches are smaller than usual (requests isolated
after a crash, batches cut after an out-of-memory error, a bisected batch) they
can wait longer than ``prefetch_batches x expected_batch_s``, and would be
delivered a second time while still held.

This thread refreshes the recorded time of every held message every quarter of
the visibility timeout (``ZADD XX``: a message acknowledged or put back
meanwhile is not recorded again). A worker that dies stops refreshing, and its
messages come back one visibility timeout after the last refresh.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import redis

log = logging.getLogger(__name__)


class LeaseKeeper:
    def __init__(self, client: Any, held: Callable[[], Iterable[Any]],
                 visibility_timeout_s: float, name: str = "imagegenx-lease") -> None:
        self.client = client
        self._held = held  # () -> request states held now (buffered, running, finishing)
        self.interval_s = max(0.25, visibility_timeout_s / 4.0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self.renewals = 0

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)

    def _main(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.renew()
            except Exception as exc:  # noqa: BLE001 - retried at the next interval
                log.warning("could not refresh the visibility of held messages: %r", exc)

    def renew(self) -> int:
        """Record every held message as delivered now; returns how many were held."""
        now = time.time()
        by_index: dict[str, dict[str, float]] = {}
        held = list(self._held())
        for state in held:
            message = getattr(state.delivery, "message", None)
            tag = getattr(message, "delivery_tag", None)
            qos = getattr(getattr(message, "channel", None), "qos", None)
            index = getattr(qos, "unacked_index_key", None)
            if tag is None or index is None:
                continue
            by_index.setdefault(index, {})[tag] = now
        count = 0
        for index, scores in by_index.items():
            try:
                self.client.zadd(index, scores, xx=True)
            except redis.RedisError as exc:
                log.warning("could not refresh the visibility of %d messages: %r", len(scores), exc)
                continue
            count += len(scores)
        for state in held:
            state.leased_at = now
        self.renewals += 1
        return count
