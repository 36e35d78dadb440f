"""The model-owning thread of the request scheduler: waits as the batching
policy says, then runs whole batches.

The Celery consumer thread only appends to the buffer; this thread owns the
engine (loads it, runs it) so that no model state crosses threads, and while
it runs a batch the consumer keeps receiving and the next batch forms.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

from imagegenx.batching import Batch, BatchPolicy
from imagegenx.errors import DeviceLost
from workers.model_thread import ModelThread

T = TypeVar("T")
log = logging.getLogger(__name__)


class BatchRunner(ModelThread, Generic[T]):
    """One thread: ``setup()`` once, then ``execute(batch)`` for each due batch."""

    def __init__(
        self,
        policy: BatchPolicy[T],
        execute: Callable[[Batch[T]], None],
        setup: Callable[[], None] = lambda: None,
        clock: Callable[[], float] = time.monotonic,
        name: str = "imagegenx-batch",
    ) -> None:
        super().__init__(setup, name)
        self.policy = policy
        self._execute = execute
        self._clock = clock
        self.running: Batch[T] | None = None
        self.batches_run = 0
        # The batch that was running when the device was lost: handed back by ``close``.
        self._given_back: list[T] = []

    # -- consumer side -----------------------------------------------------
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
            buffered = self._given_back + list(self.policy)
            running = self.running.items if self.running else []
        return buffered, running

    def limits(self) -> tuple[int, float]:
        """(max images per batch, max wait in seconds)."""
        return self.policy.max_batch, self.policy.max_wait

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
        with self._cond:  # an RLock: drop_buffered takes it again
            self._begin_draining()
            return self.drop_buffered()

    def drop_buffered(self) -> list[T]:
        """Remove and return everything buffered, and keep running."""
        with self._cond:
            given_back, self._given_back = self._given_back, []
            return given_back + self.policy.drain()

    def stop(self, timeout: float | None = None) -> list[T]:
        """Let the running batch finish; return what was still buffered."""
        leftovers = self.close()
        self.join(timeout)
        return leftovers

    # -- runner thread -----------------------------------------------------
    def serve(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            try:
                self._execute(batch)
            except DeviceLost as exc:  # nothing more runs here: the batch goes back first
                with self._cond:
                    self._given_back = list(batch.items)
                    self.running = None
                    self._fault(str(exc))
                return
            except Exception:  # noqa: BLE001 - the executor reports per request
                log.exception("batch executor failed")
            finally:
                with self._cond:
                    self.running = None
                    self.batches_run += 1

    def _next_batch(self) -> Batch[T] | None:
        with self._cond:
            while not self.draining:
                now = self._clock()
                batch = self.policy.take(now)
                if batch is not None:
                    self.running = batch
                    return batch
                deadline = self.policy.next_deadline()
                self._cond.wait(None if deadline is None else max(0.0, deadline - now))
            return None
