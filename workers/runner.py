"""The model-owning thread: waits as the batching policy says, then runs batches.

The Celery consumer thread only appends to the buffer; this thread owns the
engine (loads it, runs it) so that no model state crosses threads, and while
it runs a batch the consumer keeps receiving and the next batch forms.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

from imagegenx.batching import Batch, BatchPolicy

T = TypeVar("T")
log = logging.getLogger(__name__)


class BatchRunner(Generic[T]):
    """One thread: ``setup()`` once, then ``execute(batch)`` for each due batch."""

    def __init__(
        self,
        policy: BatchPolicy[T],
        execute: Callable[[Batch[T]], None],
        setup: Callable[[], None] = lambda: None,
        clock: Callable[[], float] = time.monotonic,
        name: str = "imagegenx-batch",
    ) -> None:
        self.policy = policy
        self._execute = execute
        self._setup = setup
        self._clock = clock
        self._cond = threading.Condition()
        self._stopping = False
        self._ready = threading.Event()
        self._setup_error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self.running: Batch[T] | None = None
        self.batches_run = 0

    # -- consumer side -----------------------------------------------------
    def start(self, timeout: float | None = None) -> None:
        """Start the thread and wait until ``setup`` finished (re-raising its error)."""
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError("engine setup did not finish in time")
        if self._setup_error is not None:
            raise RuntimeError("engine setup failed") from self._setup_error

    def add(self, item: T, key: Hashable, images: int = 1) -> None:
        with self._cond:
            self.policy.add(item, key, self._clock(), images)
            self._cond.notify()

    def discard(self, predicate: Callable[[T], bool]) -> list[T]:
        with self._cond:
            return self.policy.discard(predicate)

    def snapshot(self) -> tuple[list[T], list[T]]:
        """(buffered, running) items, for inspection."""
        with self._cond:
            buffered = [p.item for p in self.policy]
            running = self.running.items if self.running else []
        return buffered, running

    def set_limits(self, max_batch: int | None = None, max_wait: float | None = None) -> None:
        with self._cond:
            if max_batch is not None:
                self.policy.max_batch = max_batch
            if max_wait is not None:
                self.policy.max_wait = max_wait
            self._cond.notify()

    def close(self) -> list[T]:
        """Take no more batches; return what was buffered at once (oldest first).

        The running batch, if any, goes on: ``join`` waits for it.
        """
        with self._cond:
            self._stopping = True
            self._cond.notify()
            return self.policy.drain()

    def join(self, timeout: float | None = None) -> None:
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def drop_buffered(self) -> list[T]:
        """Remove and return everything buffered, and keep running."""
        with self._cond:
            return self.policy.drain()

    def stop(self, timeout: float | None = None) -> list[T]:
        """Let the running batch finish; return what was still buffered."""
        leftovers = self.close()
        self.join(timeout)
        return leftovers

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    # -- runner thread -----------------------------------------------------
    def _main(self) -> None:
        try:
            self._setup()
        except BaseException as exc:  # noqa: BLE001 - reported to start()
            log.exception("engine setup failed")
            self._setup_error = exc
            self._ready.set()
            return
        self._ready.set()
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            try:
                self._execute(batch)
            except Exception:  # noqa: BLE001 - the executor reports per request
                log.exception("batch executor failed")
            finally:
                with self._cond:
                    self.running = None
                    self.batches_run += 1

    def _next_batch(self) -> Batch[T] | None:
        with self._cond:
            while not self._stopping:
                now = self._clock()
                batch = self.policy.take(now)
                if batch is not None:
                    self.running = batch
                    return batch
                deadline = self.policy.next_deadline()
                self._cond.wait(None if deadline is None else max(0.0, deadline - now))
            return None
