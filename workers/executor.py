"""Celery side of running one batch: worker-state bookkeeping, task events,
per-request results in the result backend, progress, revocation and acks; each
request's event stream and webhooks through ``workers.callbacks``.

Each request gets its own STARTED / PROGRESS / SUCCESS or FAILURE or REVOKED
state, its own task events (so Flower shows it with its own runtime) and is
acknowledged only after its result is stored.

The model thread runs the engine phase of a batch (with its progress and
revocation checks) and hands the rest (rendering, storing, results, webhooks,
acks) to the finishing thread (``workers.finisher``), so the next batch's
engine run overlaps it.
"""
from __future__ import annotations

import logging
import os
import threading
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import redis
from celery import states as task_states
from celery.worker import state as worker_state
from celery.worker.request import Request

from imagegenx.batching import Batch
from imagegenx.errors import DeviceLost, GenerationError
from imagegenx.pipeline import BatchPipeline, Outcome, StepOutput
from imagegenx.preview import encode as encode_preview
from imagegenx.preview import preview_due
from imagegenx.request_state import RequestState
from workers import callbacks
from workers.finisher import Finisher

log = logging.getLogger(__name__)

# How long a finished request waits for the result backend to come back.
STORE_RETRY_S = 120.0
# Preview batches (one per progress store) queued for the preview thread at most.
PREVIEW_BACKLOG = 4


@dataclass
class BatchStats:
    """Counters for ``celery inspect stats`` and metrics."""

    batches: int = 0
    images: int = 0
    requests: int = 0
    failed: int = 0
    revoked: int = 0
    size_histogram: dict[int, int] = field(default_factory=dict)
    # Step scheduler: UNet calls, the rows they ran, and how many calls ran n rows.
    unet_calls: int = 0
    unet_rows: int = 0
    unet_s: float = 0.0  # time in UNet calls: the throughput behind GET /api/v1/queue
    # UNet rows the calls really ran: two per image inside its guidance interval, one outside.
    model_rows: int = 0
    rows_histogram: dict[int, int] = field(default_factory=dict)
    last_batch_s: float = 0.0
    wait_s_total: float = 0.0
    wait_s_max: float = 0.0
    succeeded: int = 0
    # Prometheus metrics (workers.metrics.WorkerMetrics) fed with the same records.
    metrics: Any = field(default=None, repr=False, compare=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def record_wait(self, seconds: float) -> None:
        """Time a request spent in the worker's buffer before its batch started."""
        self.wait_s_total += seconds
        self.wait_s_max = max(self.wait_s_max, seconds)
        if self.metrics is not None:
            self.metrics.wait(seconds)

    def record(self, size: int, requests: int, seconds: float) -> None:
        self.batches += 1
        self.images += size
        self.requests += requests
        self.size_histogram[size] = self.size_histogram.get(size, 0) + 1
        self.last_batch_s = seconds
        if self.metrics is not None:
            self.metrics.batch(size, seconds)

    def record_step(self, rows: int, seconds: float, model_rows: int | None = None) -> None:
        """One UNet call of the step scheduler over ``rows`` image rows, which ran
        ``model_rows`` UNet rows (default: two per image, all guided)."""
        self.unet_calls += 1
        self.unet_rows += rows
        self.model_rows += 2 * rows if model_rows is None else model_rows
        self.unet_s += seconds
        self.rows_histogram[rows] = self.rows_histogram.get(rows, 0) + 1
        if self.metrics is not None:
            self.metrics.step(rows, seconds)

    def record_engine(self, seconds: float) -> None:
        """Engine time of one engine batch (a bisected batch has several)."""
        if self.metrics is not None:
            self.metrics.engine(seconds)

    def record_outcome(self, state: str, images: int = 0) -> None:
        """A request finished: SUCCESS (with its images), FAILURE or REVOKED.

        Called from the consumer thread (invalid, revoked on arrival), the
        model thread (revoked) and the finishing thread.
        """
        with self._lock:
            if state == task_states.SUCCESS:
                self.succeeded += 1
            elif state == task_states.FAILURE:
                self.failed += 1
            elif state == task_states.REVOKED:
                self.revoked += 1
        if self.metrics is not None:
            self.metrics.outcome(state, images)

    def as_dict(self) -> dict[str, Any]:
        return {
            "batches": self.batches,
            "images": self.images,
            "requests": self.requests,
            "succeeded": self.succeeded,
            "failed": self.failed,
            "revoked": self.revoked,
            "mean_batch_images": self.images / self.batches if self.batches else 0.0,
            "batch_size_histogram": {str(k): v for k, v in sorted(self.size_histogram.items())},
            "unet_calls": self.unet_calls,
            "unet_rows": self.unet_rows,
            "unet_seconds": self.unet_s,
            "mean_rows_per_call": self.unet_rows / self.unet_calls if self.unet_calls else 0.0,
            "unet_model_rows": self.model_rows,
            "mean_model_rows_per_call": self.model_rows / self.unet_calls if self.unet_calls else 0.0,
            "rows_per_call_histogram": {str(k): v for k, v in sorted(self.rows_histogram.items())},
            "last_batch_s": self.last_batch_s,
            "mean_buffer_wait_ms": 1000 * self.wait_s_total / self.requests if self.requests else 0.0,
            "max_buffer_wait_ms": 1000 * self.wait_s_max,
        }


def _summary(result: dict[str, Any]) -> str:
    urls = [im["url"] for im in result.get("images", [])]
    return f"{{'images': {urls!r}, 'batch': {result.get('batch')!r}}}"


class BatchExecutor:
    """Runs a ``Batch[RequestState]`` through the pipeline and reports to Celery;
    the step runner hands its step outputs to the same finishing thread."""

    def __init__(
        self,
        pipeline: Callable[[], BatchPipeline],
        progress_interval_s: float = 0.5,
        stats: BatchStats | None = None,
        ledger: Any = None,
        store_retry_s: float = STORE_RETRY_S,
        finish_backlog: int = 1,
    ) -> None:
        self._pipeline = pipeline
        self.progress_interval_s = progress_interval_s
        self.stats = stats or BatchStats()
        self.ledger = ledger  # workers.deliveries.DeliveryLedger, or None
        self.store_retry_s = store_retry_s
        self._finisher: Finisher[StepOutput] = Finisher(self._finish, backlog=finish_backlog)
        # Previews are encoded and stored off the model thread; the lock orders the
        # PROGRESS stores of both threads so the latest preview is never replaced by an older one.
        self._preview_pool = ThreadPoolExecutor(1, thread_name_prefix="imagegenx-preview")
        self._progress_lock = threading.Lock()
        self._previews_queued = 0

    def __call__(self, batch: Batch[RequestState]) -> None:
        """On the model thread: the engine phase; the rest goes to the finisher."""
        states = [e for e in batch.items if not self.revoked(e) and not self.finished_before(e)]
        if not states:
            return
        t0 = time.perf_counter()
        self.accept(states)
        try:
            output = self._pipeline().draw(states, self._step_callback(states))
        except DeviceLost:
            raise  # the runner gives the batch back to the queue: no request is to blame
        except Exception as exc:  # noqa: BLE001 - never leave a request PENDING
            log.exception("batch failed outside the pipeline")
            output = StepOutput.failed(states, GenerationError(f"{type(exc).__name__}: {exc}"))
        self.hand_over(output, t0)

    def hand_over(self, output: StepOutput, t0: float, record: bool = True) -> None:
        """Give drawn (or failed) requests to the finishing thread, which stores,
        reports and acks them; blocks while it is a batch behind. ``t0``: when their
        engine phase began; ``record``: count them as one batch in the statistics."""
        output.t0, output.record = t0, record
        self._finisher.submit(output)

    def finishing(self) -> list[RequestState]:
        """Requests drawn and not yet reported (still unacknowledged)."""
        return [e for output in self._finisher.items() for e in output.requests]

    def drain(self, timeout: float | None = None) -> bool:
        """Wait until every step output is stored, reported and acknowledged."""
        return self._finisher.drain(timeout)

    def close(self, timeout: float | None = None) -> bool:
        """Finish the step outputs handed over, then stop the finishing thread
        (those handed over later are finished in the caller's thread)."""
        self._preview_pool.shutdown(wait=False, cancel_futures=True)
        return self._finisher.close(timeout)

    def _finish(self, output: StepOutput) -> None:
        """On the finishing thread: render, store, record and report each request."""
        states = output.requests
        try:
            outcomes = self._pipeline().finish(output)
        except Exception as exc:  # noqa: BLE001 - never leave a request PENDING
            log.exception("batch failed outside the pipeline")
            error = GenerationError(f"{type(exc).__name__}: {exc}")
            outcomes = {e.id: Outcome(error=error) for e in states}
        try:
            if output.record:
                self.stats.record(sum(e.images for e in states), len(states),
                                  time.perf_counter() - output.t0)
                for seconds in output.engine_runs().values():
                    self.stats.record_engine(seconds)
        except Exception:  # noqa: BLE001 - statistics must not keep results from being reported
            log.exception("could not record the statistics of a batch")
        for state in states:
            outcome = outcomes.get(state.id) or Outcome(error=GenerationError("no outcome"))
            # Revoked while its step output waited for this thread: REVOKED, not a result.
            if not outcome.dropped and state.delivery.id in worker_state.revoked:
                if state.delivery._already_revoked or self.revoked(state):  # REVOKED stays
                    continue
            try:
                self._report(state, outcome)
            except Exception:  # noqa: BLE001 - one request's report must not stop the others
                log.exception("could not report %s; its message is left for redelivery", state.delivery.id)
                worker_state.task_ready(state.delivery)

    # -- per request -------------------------------------------------------
    def revoked(self, state: RequestState) -> bool:
        """Revoked or expired: marked REVOKED, reported and acked (True), or running on."""
        try:
            revoked = state.delivery.revoked()  # marks REVOKED (or expired), sends the event, acks
        except Exception:  # noqa: BLE001 - backend or broker gone: leave it for redelivery
            log.exception("could not mark %s revoked; its message is left for redelivery", state.delivery.id)
            worker_state.task_ready(state.delivery)
            return True
        if revoked:
            self.stats.record_outcome(task_states.REVOKED)
            callbacks.revoked(state.delivery)
            return True
        return False

    def finished_before(self, state: RequestState) -> bool:
        """A redelivered request whose result is already stored is acknowledged, not rerun."""
        if not state.redelivered:
            return False
        req = state.delivery
        try:
            status = req.task.backend.get_task_meta(req.id, cache=False).get("status")
        except Exception as exc:  # noqa: BLE001 - unknown: run it (SUCCESS is never overwritten)
            log.warning("could not read the state of %s: %r", req.id, exc)
            return False
        if status not in (task_states.SUCCESS, task_states.FAILURE):
            return False
        log.info("%s already finished (%s): acknowledged without running it again", req.id, status)
        worker_state.task_ready(req)
        self._ack(req)
        return True

    def accept(self, states: list[RequestState]) -> None:
        """The requests start running: worker state, task-started, STARTED, delivery count.

        A suspect (it ran before on a lost worker) starts only once the requests
        drawn before it are stored and acknowledged: if it kills this process too,
        it takes no finished neighbour's result down with it."""
        if any(e.suspect for e in states) and not self.drain(self.store_retry_s):
            log.warning("a suspect request starts before the requests drawn before it are stored")
        pid = os.getpid()
        for e in states:
            req = e.delivery
            req.time_start = time.time()
            self.stats.record_wait(max(0.0, req.time_start - e.received_at))
            req.worker_pid = pid
            worker_state.task_accepted(req)
            req.send_event("task-started")
            info = {"hostname": req.hostname, "pid": pid}
            try:  # a state for watchers only: the batch runs without it
                req.task.backend.store_result(req.id, info, task_states.STARTED, request=req._context)
            except Exception as exc:  # noqa: BLE001
                log.warning("could not store STARTED for %s: %r", req.id, exc)
            callbacks.started(req, info)
        if self.ledger is not None:
            self.ledger.started(e.delivery.id for e in states)

    def progress(self, states: list[RequestState], now: float, engine: Any = None) -> None:
        """Store PROGRESS (each request's own step and total) for the requests whose
        last store is ``progress_interval_s`` old; a backend outage only logs.

        Entries due a preview (``imagegenx.preview``: the rule) get it here: the
        engine projects their latents (queued on the device), and the preview
        thread encodes the PNGs and stores their PROGRESS with it. The others'
        PROGRESS carries their latest preview, if any.
        """
        due = [e for e in states if now - e.progress_at >= self.progress_interval_s
               and e.denoising is not None and not e.denoising.done]
        if not due:
            return
        wanting = self._previews_due(due, engine)
        for e in due:
            e.progress_at = now
            e.progress_step = e.denoising.index
        stored = []
        for e in (e for e in due if e not in wanting):
            meta = self._progress_meta(e, e.denoising.index, e.denoising.steps)
            try:
                with self._progress_lock:
                    e.delivery.task.backend.store_result(e.delivery.id, meta, "PROGRESS", request=e.delivery._context)
            except Exception as exc:  # noqa: BLE001 - progress is for watchers only
                log.warning("could not store progress of %s: %r", e.delivery.id, exc)
                break
            # The event stream gets the step only: a preview is published once, by the
            # preview thread that drew it.
            stored.append((e.delivery, {"step": meta["step"], "total": meta["total"]}))
        callbacks.progress_many(stored)  # their event streams, in one round trip

    @staticmethod
    def _progress_meta(e: RequestState, step: int, total: int) -> dict[str, Any]:
        meta: dict[str, Any] = {"step": step, "total": total}
        if e.preview is not None:
            meta["preview"] = e.preview
        return meta

    def _previews_due(self, due: list[RequestState], engine: Any) -> list[RequestState]:
        """Take the previews due among ``due`` (one projection) and queue their
        encoding and storing; the requests whose PROGRESS the preview thread stores."""
        if engine is None or not callable(getattr(engine, "preview", None)):
            return []
        wanting = [e for e in due if e.request.preview is not None
                   and preview_due(e.denoising.index, e.request.preview.every, e.preview_step)]
        # A preview thread that fell behind (a slow backend): the previews stay due
        # and are taken at a later progress store.
        if not wanting or self._previews_queued >= PREVIEW_BACKLOG:
            return []
        try:
            frames = engine.preview([e.denoising for e in wanting])
        except Exception as exc:  # noqa: BLE001 - previews are for watchers only
            log.warning("could not take previews of %d requests: %r", len(wanting), exc)
            return []
        steps = [(e.denoising.index, e.denoising.steps) for e in wanting]
        for e, (step, _) in zip(wanting, steps):
            e.preview_step = step
        with self._progress_lock:
            self._previews_queued += 1
        try:
            self._preview_pool.submit(self._store_previews, wanting, steps, frames)
        except RuntimeError:  # shutting down: the model thread stores plain progress
            with self._progress_lock:
                self._previews_queued -= 1
            return []
        return wanting

    def _store_previews(self, states: list[RequestState], steps: list[tuple[int, int]], frames: Any) -> None:
        """On the preview thread: wait for the pixels, encode each request's PNG and
        store its PROGRESS with it (unless it has finished meanwhile)."""
        try:
            arrays = frames.arrays()
            for e, (step, total), images in zip(states, steps, arrays):
                preview = encode_preview(images, step)
                with self._progress_lock:
                    e.preview = preview
                    if e.denoising is None or e.denoising.done or e.delivery.id in worker_state.revoked:
                        continue  # its result (or revocation) is on its way: no PROGRESS after it
                    meta = self._progress_meta(e, max(step, e.progress_step), total)
                    e.delivery.task.backend.store_result(e.delivery.id, meta, "PROGRESS", request=e.delivery._context)
                    callbacks.progress(e.delivery, meta)  # a progress and a preview event, before any final one
        except Exception as exc:  # noqa: BLE001 - previews are for watchers only
            log.warning("could not store previews: %r", exc)
        finally:
            with self._progress_lock:
                self._previews_queued -= 1

    def _step_callback(self, states: list[RequestState]) -> Callable[[int, int], list[str]]:
        live = {e.id: e for e in states}
        gone: list[str] = []  # revoked so far: a retried part of the batch drops them again
        last = [0.0]
        progress_failed = [False]

        def on_step(step: int, total: int) -> list[str]:
            dropped = [state_id for state_id, e in live.items() if e.delivery.id in worker_state.revoked]
            for state_id in dropped:
                self.revoked(live.pop(state_id))
            gone.extend(dropped)
            now = time.monotonic()
            if step < total and now - last[0] >= self.progress_interval_s:
                last[0] = now
                stored = []
                try:  # progress is for watchers: a backend outage must not fail the batch
                    for e in live.values():
                        e.delivery.task.backend.store_result(
                            e.delivery.id, {"step": step, "total": total}, "PROGRESS",
                            request=e.delivery._context,
                        )
                        stored.append((e.delivery, {"step": step, "total": total}))
                except Exception as exc:  # noqa: BLE001
                    if not progress_failed[0]:
                        log.warning("could not store progress (step %d/%d): %r", step, total, exc)
                    progress_failed[0] = True
                callbacks.progress_many(stored)
            return list(gone)

        return on_step

    def _report(self, state: RequestState, outcome: Outcome) -> None:
        req = state.delivery
        if outcome.dropped:
            if not req._already_revoked:  # dropped without a revoke: report it
                self._fail(req, GenerationError("request left its batch"))
            return
        runtime = time.time() - (req.time_start or time.time())
        if outcome.result is not None:
            result = outcome.result.model_dump(mode="json")
            if not self._store(req, "its result",
                               lambda: req.task.backend.mark_as_done(req.id, result,
                                                                     request=req._context)):
                worker_state.task_ready(req)
                return
            callbacks.notify(req, task_states.SUCCESS, result=result)  # final event, webhook; before the ack
            worker_state.task_ready(req, successful=True)
            self._ack(req)
            req.send_event("task-succeeded", result=_summary(result), runtime=runtime)
            self.stats.record_outcome(task_states.SUCCESS, images=len(result.get("images", [])))
            return
        self._fail(req, outcome.error or GenerationError("unknown error"))

    def _fail(self, req: Request, error: BaseException) -> None:
        self.stats.record_outcome(task_states.FAILURE)
        tb = "".join(traceback.format_exception(error))
        if not self._store(req, "its failure",
                           lambda: req.task.backend.mark_as_failure(req.id, error, traceback=tb,
                                                                    request=req._context)):
            worker_state.task_ready(req)
            return
        callbacks.notify(req, task_states.FAILURE, error=error)  # final event, webhook; before the ack
        worker_state.task_ready(req)
        self._ack(req)
        req.send_event("task-failed", exception=repr(error), traceback=tb)

    def fail(self, req: Request, error: BaseException) -> None:
        """End a request that never joined a batch with FAILURE (stored, then acked)."""
        self._fail(req, error)

    def _store(self, req: Request, what: str, store: Callable[[], object]) -> bool:
        """Write to the result backend, retrying while it is unreachable.

        The request is acknowledged only once its result is stored; after
        ``store_retry_s`` in vain its message stays unacknowledged and the
        broker delivers it again after the visibility timeout.
        """
        deadline = time.monotonic() + self.store_retry_s
        delay = 0.1
        logged = False
        while True:
            try:
                store()
                return True
            except Exception as exc:  # noqa: BLE001
                if not _transient(req, exc) or time.monotonic() + delay > deadline:
                    log.error("could not store %s for %s (%r); its message is left for redelivery",
                              what, req.id, exc)
                    return False
                if not logged:
                    log.warning("result backend unavailable (%r); storing %s for %s again for up "
                                "to %.0f s", exc, what, req.id, self.store_retry_s)
                    logged = True
                time.sleep(delay)
                delay = min(2 * delay, 2.0)

    @staticmethod
    def _ack(req: Request) -> None:
        try:
            req.acknowledge()  # logs (and swallows) broker connection errors
        except Exception:  # noqa: BLE001 - an unacked message is redelivered, then skipped
            log.exception("could not acknowledge %s", req.id)



def _transient(req: Request, exc: BaseException) -> bool:
    """A connection-level error worth retrying (the backend or its network is down)."""
    backend = req.task.backend
    safe = getattr(backend, "exception_safe_to_retry", None)
    return bool(
        isinstance(exc, (OSError, redis.ConnectionError, redis.TimeoutError))
        or (callable(safe) and safe(exc))
    )
