"""Celery side of running one batch: worker-state bookkeeping, task events,
per-request results in the result backend, progress, revocation and acks.

Each request gets its own STARTED / PROGRESS / SUCCESS or FAILURE or REVOKED
state, its own task events (so Flower shows it with its own runtime) and is
acknowledged only after its result is stored.
"""
from __future__ import annotations

import logging
import os
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from celery import states
from celery.worker import state as worker_state
from celery.worker.request import Request

from imagegenx.batching import Batch
from imagegenx.errors import GenerationError
from imagegenx.pipeline import BatchPipeline, Job, Outcome

log = logging.getLogger(__name__)


@dataclass
class Entry:
    """A buffered request: the Celery request and the validated job."""

    req: Request
    job: Job
    images: int


@dataclass
class BatchStats:
    """Counters for ``celery inspect stats`` and metrics."""

    batches: int = 0
    images: int = 0
    requests: int = 0
    failed: int = 0
    revoked: int = 0
    size_histogram: dict[int, int] = field(default_factory=dict)
    last_batch_s: float = 0.0
    wait_s_total: float = 0.0
    wait_s_max: float = 0.0

    def record_wait(self, seconds: float) -> None:
        """Time a request spent in the worker's buffer before its batch started."""
        self.wait_s_total += seconds
        self.wait_s_max = max(self.wait_s_max, seconds)

    def record(self, size: int, requests: int, seconds: float) -> None:
        self.batches += 1
        self.images += size
        self.requests += requests
        self.size_histogram[size] = self.size_histogram.get(size, 0) + 1
        self.last_batch_s = seconds

    def as_dict(self) -> dict[str, Any]:
        return {
            "batches": self.batches,
            "images": self.images,
            "requests": self.requests,
            "failed": self.failed,
            "revoked": self.revoked,
            "mean_batch_images": self.images / self.batches if self.batches else 0.0,
            "batch_size_histogram": {str(k): v for k, v in sorted(self.size_histogram.items())},
            "last_batch_s": self.last_batch_s,
            "mean_buffer_wait_ms": 1000 * self.wait_s_total / self.requests if self.requests else 0.0,
            "max_buffer_wait_ms": 1000 * self.wait_s_max,
        }


def _summary(result: dict[str, Any]) -> str:
    urls = [im["url"] for im in result.get("images", [])]
    return f"{{'images': {urls!r}, 'batch': {result.get('batch')!r}}}"


class BatchExecutor:
    """Runs a ``Batch[Entry]`` through the pipeline and reports to Celery."""

    def __init__(
        self,
        pipeline: Callable[[], BatchPipeline],
        progress_interval_s: float = 0.5,
        stats: BatchStats | None = None,
    ) -> None:
        self._pipeline = pipeline
        self.progress_interval_s = progress_interval_s
        self.stats = stats or BatchStats()

    def __call__(self, batch: Batch[Entry]) -> None:
        entries = [e for e in batch.items if not self._revoked(e)]
        if not entries:
            return
        t0 = time.perf_counter()
        self._accept(entries)
        try:
            outcomes = self._pipeline().run([e.job for e in entries], self._step_callback(entries))
        except Exception as exc:  # noqa: BLE001 - never leave a request PENDING
            log.exception("batch failed outside the pipeline")
            error = GenerationError(f"{type(exc).__name__}: {exc}")
            outcomes = {e.job.id: Outcome(error=error) for e in entries}
        elapsed = time.perf_counter() - t0
        self.stats.record(sum(e.images for e in entries), len(entries), elapsed)
        for entry in entries:
            self._report(entry, outcomes.get(entry.job.id) or Outcome(error=GenerationError("no outcome")))

    # -- per request -------------------------------------------------------
    def _revoked(self, entry: Entry) -> bool:
        if entry.req.revoked():  # marks REVOKED (or expired), sends the event, acks
            self.stats.revoked += 1
            return True
        return False

    def _accept(self, entries: list[Entry]) -> None:
        pid = os.getpid()
        for e in entries:
            req = e.req
            req.time_start = time.time()
            self.stats.record_wait(max(0.0, req.time_start - e.job.received_at))
            req.worker_pid = pid
            worker_state.task_accepted(req)
            req.send_event("task-started")
            req.task.backend.store_result(
                req.id, {"hostname": req.hostname, "pid": pid}, states.STARTED, request=req._context
            )

    def _step_callback(self, entries: list[Entry]) -> Callable[[int, int], list[str]]:
        live = {e.job.id: e for e in entries}
        last = [0.0]

        def on_step(step: int, total: int) -> list[str]:
            dropped = [jid for jid, e in live.items() if e.req.id in worker_state.revoked]
            for jid in dropped:
                self._revoked(live.pop(jid))
            now = time.monotonic()
            if step < total and now - last[0] >= self.progress_interval_s:
                last[0] = now
                for e in live.values():
                    e.req.task.backend.store_result(
                        e.req.id, {"step": step, "total": total}, "PROGRESS", request=e.req._context
                    )
            return dropped

        return on_step

    def _report(self, entry: Entry, outcome: Outcome) -> None:
        req = entry.req
        if outcome.dropped:
            if not req._already_revoked:  # dropped without a revoke: report it
                self._fail(req, GenerationError("request left its batch"))
            return
        runtime = time.time() - (req.time_start or time.time())
        if outcome.result is not None:
            result = outcome.result.model_dump(mode="json")
            req.task.backend.mark_as_done(req.id, result, request=req._context)
            worker_state.task_ready(req, successful=True)
            req.acknowledge()
            req.send_event("task-succeeded", result=_summary(result), runtime=runtime)
            return
        self._fail(req, outcome.error or GenerationError("unknown error"))

    def _fail(self, req: Request, error: BaseException) -> None:
        self.stats.failed += 1
        tb = "".join(traceback.format_exception(error))
        req.task.backend.mark_as_failure(req.id, error, traceback=tb, request=req._context)
        worker_state.task_ready(req)
        req.acknowledge()
        req.send_event("task-failed", exception=repr(error), traceback=tb)
