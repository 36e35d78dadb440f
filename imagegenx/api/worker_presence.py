"""Which workers answer a ping, as the health check reports it.

One Celery ping is a broadcast that every worker answers and that waits its
whole timeout for the replies. When each /healthz request sent its own (0.5 s),
48 concurrent checks made every worker answer 48 broadcasts at once while it
was busy drawing, replies came late, and /healthz answered a false 503. Here at
most one ping is in flight per API process; the answer is reused for
``max_age_s``, and while a fresh one is fetched (in the background) the last
known answer is given, so no health check waits except the very first.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)


class WorkerPresence:
    """The last answer of ``ping`` (worker names), refreshed by one caller at a time."""

    def __init__(self, ping: Callable[[], list[str]], max_age_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._ping = ping
        self._max_age_s = max_age_s
        self._clock = clock
        self._lock = threading.Lock()
        self._refreshing = False
        self._workers: list[str] | None = None
        self._at = 0.0

    def workers(self) -> list[str]:
        """Names of the workers that answered the latest ping."""
        with self._lock:
            known, fresh = self._workers, self._fresh()
            start = not fresh and not self._refreshing
            if start:
                self._refreshing = True
        if known is None:
            if start:
                self._refresh()
            else:
                self._wait_for_first()
            return self._workers or []
        if start:
            threading.Thread(target=self._refresh, name="worker-ping", daemon=True).start()
        return known

    def _fresh(self) -> bool:
        return self._workers is not None and self._clock() - self._at < self._max_age_s

    def _refresh(self) -> None:
        try:
            workers = sorted(self._ping())
        except Exception:  # noqa: BLE001 - a failed ping means no worker answered
            log.warning("worker ping failed", exc_info=True)
            workers = []
        with self._lock:
            self._workers, self._at, self._refreshing = workers, self._clock(), False

    def _wait_for_first(self) -> None:
        while True:
            with self._lock:
                if self._workers is not None or not self._refreshing:
                    return
            time.sleep(0.01)
