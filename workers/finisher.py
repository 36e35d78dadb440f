"""The finishing thread: the CPU and network work that follows an engine phase.

The model thread hands each step output (``imagegenx.pipeline.StepOutput``)
over and starts the next engine phase at once, so the GPU does not wait while
the previous one's images are encoded, stored, reported and acknowledged. The
hand-over is bounded: besides the step output being finished, at most
``backlog`` wait, and the model thread blocks when the finisher falls further
behind, which keeps memory and result latency bounded.
"""
from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")
log = logging.getLogger(__name__)


class Finisher(Generic[T]):
    """One thread calling ``finish(item)`` for each handed-over item, in order."""

    def __init__(self, finish: Callable[[T], None], backlog: int = 1,
                 name: str = "imagegenx-finish") -> None:
        self._finish = finish
        self._slots = threading.Semaphore(backlog + 1)
        self._cond = threading.Condition()
        self._waiting: deque[T] = deque()
        self._current: list[T] = []
        self._closed = False
        self._name = name
        self._thread: threading.Thread | None = None

    def submit(self, item: T) -> None:
        """Hand ``item`` over; blocks while the finisher is ``backlog`` items behind.

        Once closed, ``item`` is finished in the calling thread: nothing is lost.
        """
        self._slots.acquire()
        with self._cond:
            if not self._closed:
                self._waiting.append(item)
                if self._thread is None:
                    self._thread = threading.Thread(target=self._main, name=self._name, daemon=True)
                    self._thread.start()
                self._cond.notify_all()
                return
        try:
            self._finish_logged(item)
        finally:
            self._slots.release()

    def items(self) -> list[T]:
        """Items being finished or waiting for it, oldest first."""
        with self._cond:
            return self._current + list(self._waiting)

    def drain(self, timeout: float | None = None) -> bool:
        """Wait until every handed-over item is finished; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._waiting and not self._current, timeout)

    def close(self, timeout: float | None = None) -> bool:
        """Finish what was handed over, then stop the thread; False on timeout."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
            return not thread.is_alive()
        return True

    def _main(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._waiting or self._closed)
                if not self._waiting:
                    return
                item = self._waiting.popleft()
                self._current = [item]
            try:
                self._finish_logged(item)
            finally:
                with self._cond:
                    self._current = []
                    self._cond.notify_all()
                self._slots.release()

    def _finish_logged(self, item: T) -> None:
        try:
            self._finish(item)
        except Exception:  # noqa: BLE001 - ``finish`` reports per request; keep finishing
            log.exception("finishing a batch failed")
