"""The model-owning thread of the step scheduler: one UNet call at a time.

Every iteration is ``schedule -> execute -> update``:

1. **schedule** (``StepScheduler.schedule``, pure): waiting requests join the
   running set at this step boundary (priority, fair share, row limit);
2. **execute**: admitted requests get their trajectory (``engine.begin``:
   prompt embeddings, noise, schedule); revoked or expired running requests
   leave; one ``engine.step`` advances every running row by its own step;
3. **update**: PROGRESS per request; requests whose own steps are done are
   decoded together (on the engine's decode stream where it has one: the next
   UNet calls are queued while the device decodes) and, once their images are
   on the host, handed to the finishing thread (store, result, ack) and leave
   the running set; the others go on meanwhile.

Failures stay with their request: a failed ``begin`` or decode fails that
request; a failed UNet call is retried once per request, so only the culprit
fails; an out-of-memory call lowers the row limit and sends the rows that no
longer fit back to waiting, with their trajectory kept (unless decodes ran beside
it: their memory is not counted in rows, so the call runs again once they end). A lost device (a
device error after which the engine's probe fails: a sticky CUDA error, whose
culprit is unknown and whose context is unusable) fails no request: every
running request goes back to waiting, the loop ends in ``FAULTED``, and the
worker gives them all back to the queue and exits.
"""
from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

from celery.worker import state as worker_state

from imagegenx import guidance
from imagegenx.engine.base import DecodedNow, PendingDecode, StepEngine, start_decode
from imagegenx.engine.step_clock import CallLedger
from imagegenx.errors import DeviceLost, GenerationError, is_out_of_memory
from imagegenx.pipeline import BatchPipeline, Outcome, StepOutput, as_generation_error, lost_device, plan
from imagegenx.request_state import RequestState
from imagegenx.schemas import BatchInfo
from imagegenx.step_scheduler import StepPlan, StepScheduler
from workers.executor import BatchExecutor
from workers.model_thread import ModelThread

log = logging.getLogger(__name__)

# A run of UNet calls is cut into segments of at most this long, so that the batch
# statistics (one record per run) keep coming under continuous load.
RUN_SEGMENT_S = 10.0


@dataclass
class _Decode:
    """Requests decoded together, and when their decode began."""

    states: list[RequestState]
    pending: PendingDecode
    t0: float


class StepRunner(ModelThread):
    """The step loop over a :class:`StepScheduler` of :class:`RequestState` records."""

    def __init__(
        self,
        scheduler: StepScheduler[RequestState],
        executor: BatchExecutor,
        pipeline: Callable[[], BatchPipeline],
        setup: Callable[[], None] = lambda: None,
        clock: Callable[[], float] = time.monotonic,
        name: str = "imagegenx-steps",
    ) -> None:
        super().__init__(setup, name)
        self.scheduler = scheduler
        self.executor = executor
        self._pipeline = pipeline
        self._clock = clock
        self.configured_rows = scheduler.max_rows
        # Most rows one UNet call ran without running out of memory.
        self.largest_ok_rows = 0
        self.oom_row_limit: int | None = None
        # The current run: UNet calls since the running set was last empty (or the
        # last segment). A request's result names the run it started in as its batch
        # id; the run is recorded as one batch (its requests, images and UNet time).
        self._run_id: str | None = None
        self._run_t0 = 0.0
        self._run_images = 0
        self._run_requests = 0
        self._run_engine_s = 0.0
        # Calls queued on the device whose device time the engine has not reported yet
        # (engines whose step returns before the device has run it).
        self._unreported = CallLedger(lambda rows, s, unet_rows: self.executor.stats.record_step(rows, s, unet_rows))
        # Decodes queued on the device, oldest first (the model thread's own).
        self._decodes: list[_Decode] = []

    def use_cost_model(self, step_seconds: Callable[[int], float | None] | None) -> None:
        """Price UNet calls with the engine's own measure (after its warm-up), so rows
        join only where they pay (``StepScheduler._worth_growing``); without one,
        every waiting request that fits joins."""
        if step_seconds is None or step_seconds(1) is None:
            return
        with self._cond:
            self.scheduler.step_cost = lambda rows: float(step_seconds(rows) or 0.0)

    # -- consumer side -------------------------------------------------------
    @staticmethod
    def reserved_rows(state: RequestState) -> int:
        """UNet rows the scheduler counts for ``state`` now: the most any of its
        remaining steps runs (two per guided image, one per other image); none
        while its decode runs."""
        if state.decoding:
            return 0
        reserved = getattr(state.denoising, "reserved_rows", None)
        if reserved is not None:
            return int(reserved)
        r = state.request
        return r.num_images * guidance.reserved_rows(r.guidance_scale, r.resolved_interval(), 0, r.steps)

    def add(self, state: RequestState, group: Hashable, *, priority: int = 0, tenant: str = "") -> None:
        with self._cond:
            self.scheduler.add(state, state.id, group, self.reserved_rows(state), self._clock(),
                               priority=priority, tenant=tenant, steps=state.request.steps,
                               need=lambda: self.reserved_rows(state))
            self._cond.notify()

    def discard(self, predicate: Callable[[RequestState], bool]) -> list[RequestState]:
        with self._cond:
            return self.scheduler.discard(predicate)

    def snapshot(self) -> tuple[list[RequestState], list[RequestState]]:
        """(waiting, running) requests, for inspection."""
        with self._cond:
            return self.scheduler.waiting, self.scheduler.running

    def limits(self) -> tuple[int, float]:
        """(most images per UNet call, longest wait before a group switch).

        The scheduler counts UNet rows: ``max_batch`` images of two rows each."""
        return max(1, self.scheduler.max_rows // 2), self.scheduler.max_wait

    def set_limits(self, max_batch: int | None = None, max_wait: float | None = None) -> None:
        with self._cond:
            if max_batch is not None:
                rows = 2 * max_batch
                self.configured_rows = rows
                limit = self.oom_row_limit
                self.scheduler.max_rows = rows if limit is None else min(limit, rows)
            if max_wait is not None:
                self.scheduler.max_wait = max_wait
            self._cond.notify()

    def close(self) -> list[RequestState]:
        """Admit nothing more; return the waiting requests at once (oldest first).

        The running requests finish their own steps: ``join`` waits for them.
        """
        with self._cond:
            self._begin_draining()
            return self.scheduler.drain()

    def drop_buffered(self) -> list[RequestState]:
        """Remove and return the waiting requests, and keep running."""
        with self._cond:
            return self.scheduler.drain()

    # -- model thread: the loop ------------------------------------------------
    def serve(self) -> None:
        while True:
            step = self._next_plan()
            if step is None:
                return
            try:
                self._run(step)
            except DeviceLost as exc:
                self._give_back_running(exc)
                return
            except Exception:  # noqa: BLE001 - never leave the loop; requests fail on their own
                log.exception("step failed outside the engine")

    def _give_back_running(self, exc: DeviceLost) -> None:
        """The device is lost: every running request goes back to waiting without its
        trajectory (``close`` then hands them to the queue), and the worker stops."""
        with self._cond:
            running = self.scheduler.running
            self._decodes.clear()
            for e in running:
                e.denoising = None
                e.decoding = False
            self.scheduler.requeue(e.id for e in running)
            self._fault(str(exc))

    def _next_plan(self) -> StepPlan[RequestState] | None:
        with self._cond:
            while True:
                if self.draining:
                    running = self.scheduler.running
                    return StepPlan(running=running) if running else None
                now = self._clock()
                step = self.scheduler.schedule(now)
                if not step.idle:
                    return step
                timeout = None if step.wake_at is None else max(0.0, step.wake_at - now)
                self._cond.wait(timeout)

    def _leave(self, states: list[RequestState]) -> None:
        if states:
            with self._cond:
                self.scheduler.finish(e.id for e in states)
                ended = not self.scheduler.running
            if ended:
                self._close_run()

    def _close_run(self) -> None:
        """Record the current run (segment) as one batch; the next call starts another."""
        if self._run_id is None:
            return
        stats = self.executor.stats
        stats.record(self._run_images, self._run_requests, time.perf_counter() - self._run_t0)
        stats.record_engine(self._run_engine_s)
        self._run_id = None

    def _run(self, step: StepPlan[RequestState]) -> None:
        engine: Any = self._pipeline().engine
        gone = [e for e in step.admitted if e.denoising is None and not self._begin(engine, e)]
        running = [e for e in step.running if e not in gone and not e.decoding]
        stuck = [e for e in running if e.denoising is None]  # its start broke outside the engine
        if stuck:
            self._fail(stuck, GenerationError("the request could not be started"))
            running = [e for e in running if e.denoising is not None]
        revoked = [e for e in running
                   if e.id in worker_state.revoked and self.executor.revoked(e)]
        running = [e for e in running if e not in revoked]
        self._leave(gone + revoked)
        if not running:
            if self._decodes:  # only decodes left to run: wait for them
                self._collect(engine, wait=True)
            if self._unreported:  # the set emptied without a decode: count its last calls now
                self._count_ended(engine, wait=True)
            return
        advanced = self._execute(engine, running)
        self.executor.progress(advanced, time.monotonic(), engine)
        done = [e for e in advanced if e.denoising.done]
        if done:
            self._start_decode(engine, done)
        self._collect(engine, wait=False)

    def _begin(self, engine: StepEngine, state: RequestState) -> bool:
        """Start a newly admitted request; False when it leaves at once."""
        if self.executor.revoked(state) or self.executor.finished_before(state):
            return False
        try:
            self.executor.accept([state])
            state.admitted_at = time.perf_counter()
            state.started_at = time.time()
            spec, _ = plan([state])
            state.denoising = engine.begin(spec)
        except Exception as exc:  # noqa: BLE001 - e.g. a prompt that cannot be encoded
            _raise_if_lost(engine, exc)
            log.error("request %s could not start: %r", state.id, exc)
            self._fail([state], as_generation_error(exc))
            return False
        return True

    def _execute(self, engine: StepEngine, running: list[RequestState]) -> list[RequestState]:
        """One UNet call for ``running``; the requests that advanced."""
        rows = sum(e.images for e in running)
        model_rows = sum(getattr(e.denoising, "unet_rows", 2 * e.images) for e in running)
        t0 = time.perf_counter()
        try:
            engine.step([e.denoising for e in running])
        except Exception as exc:  # noqa: BLE001 - isolate: only the culprit fails
            exc.__traceback__ = None  # its frames hold the call's tensors
            _raise_if_lost(engine, exc)
            if is_out_of_memory(exc) and self._decodes:
                # Decodes on their own stream held memory the rows did not count: let them
                # end and free it, and try the same call again before blaming its rows.
                self._collect(engine, wait=True)
                self._pipeline().release_memory()
                return self._execute(engine, running)
            self._pipeline().release_memory()
            return self._recover(engine, running, model_rows, exc)
        seconds = time.perf_counter() - t0
        self._record_step(engine, rows, seconds, model_rows)
        self.largest_ok_rows = max(self.largest_ok_rows, model_rows)
        if self._run_id is not None and t0 - self._run_t0 >= RUN_SEGMENT_S:
            self._close_run()
        if self._run_id is None:
            self._run_id, self._run_t0 = uuid.uuid4().hex, t0
            self._run_images = self._run_requests = 0
            self._run_engine_s = 0.0
        self._run_engine_s += seconds
        for e in running:
            if not e.run_id:
                e.run_id = self._run_id
                self._run_images += e.images
                self._run_requests += 1
            e.peak_rows = max(e.peak_rows, rows)
            e.peak_requests = max(e.peak_requests, len(running))
        return running

    def _record_step(self, engine: StepEngine, rows: int, seconds: float, model_rows: int) -> None:
        """Count one UNet call: by its device time once the device has run it, where the
        engine returns before that (CUDA), else by the host's ``seconds``."""
        if not getattr(engine, "times_steps_on_device", False):
            self.executor.stats.record_step(rows, seconds, model_rows)
            return
        self._unreported.queued(rows, model_rows)
        self._count_ended(engine)

    def _count_ended(self, engine: StepEngine, wait: bool = False) -> None:
        """Pair the calls the device has finished with their device time."""
        try:
            ended = _ended_step_seconds(engine, wait)
        except Exception as exc:  # noqa: BLE001 - timings only: the next call reports the error
            log.warning("could not read the device time of the last UNet calls: %r", exc)
            return
        self._unreported.ended(ended or [])

    def _recover(self, engine: StepEngine, running: list[RequestState], rows: int,
                 exc: Exception) -> list[RequestState]:
        if is_out_of_memory(exc):
            if len(running) == 1:
                images = sum(e.images for e in running)
                self._fail(running, GenerationError(
                    f"out of memory with {images} images in one batch ({rows} UNet rows; "
                    f"{type(exc).__name__}: {exc})"))
                return []
            self._lower_limit(rows, running)
            return []  # nothing moved: the rows that fit run at the next call
        if len(running) == 1:
            log.error("request %s failed: %r", running[0].id, exc)
            self._fail(running, as_generation_error(exc))
            return []
        log.warning("step of %d requests failed (%r); running each request alone", len(running), exc)
        advanced = []
        for e in running:
            advanced += self._execute(engine, [e])
        return advanced

    def _lower_limit(self, rows: int, running: list[RequestState]) -> None:
        """After an out-of-memory call of ``rows`` UNet rows: fewer rows from now on,
        and the requests admitted last go back to waiting until they fit."""
        ok = self.largest_ok_rows if self.largest_ok_rows < rows else 0
        limit = max(1, ok, rows // 2)
        self.oom_row_limit = limit if self.oom_row_limit is None else min(limit, self.oom_row_limit)
        log.warning("out of memory with %d images (%d UNet rows): calls are cut to at most %d UNet rows "
                    "from now on", sum(e.images for e in running), rows, limit)
        keep, used = [], 0
        for e in running:
            need = self.reserved_rows(e)
            if not keep or used + need <= limit:
                keep.append(e)
                used += need
        with self._cond:
            self.scheduler.max_rows = min(self.scheduler.max_rows, limit)
            self.scheduler.requeue(e.id for e in running if e not in keep)

    def _start_decode(self, engine: StepEngine, done: list[RequestState]) -> None:
        """Queue the finished requests' decode, together; they stay in the running set
        (at no rows) until :meth:`_collect` hands their images over."""
        t0 = time.perf_counter()
        try:
            pending = start_decode(engine, [e.denoising for e in done])
        except Exception as exc:  # noqa: BLE001 - decode once per request to find the culprit
            pending = DecodedNow(self._decode_each(engine, done, exc))
        for e in done:
            e.decoding = True
        self._decodes.append(_Decode(done, pending, t0))

    def _collect(self, engine: StepEngine, wait: bool) -> None:
        """Hand over the decodes that have ended (``wait``: all of them), in the order they
        end: one decoded at once (a fallback) does not wait behind one still on the device."""
        for d in list(self._decodes):
            try:
                if not (wait or d.pending.ready()):
                    continue
                images = d.pending.result()
            except Exception as exc:  # noqa: BLE001 - the decode broke on the device: once per request
                # Lost device: raised, and the decode stays queued until the set is given back.
                images = self._decode_each(engine, d.states, exc)
            self._decodes.remove(d)
            try:
                self._finish(engine, d.states, images, d.t0)
            except DeviceLost:
                raise
            except Exception as exc:  # noqa: BLE001 - never leave a request decoding with no decode queued
                log.exception("could not hand over %d decoded requests", len(d.states))
                for e in d.states:  # hand_over comes last in _finish: none of them went out
                    e.decoding = False
                self._fail(d.states, GenerationError(f"the images could not be handed over: {exc!r}"))

    def _finish(self, engine: StepEngine, done: list[RequestState],
                images: list[list[Any] | Exception], t0: float) -> None:
        """Hand decoded requests to the finishing thread; they leave the running set."""
        self._count_ended(engine)
        output = StepOutput(done)
        for e, imgs in zip(done, images, strict=True):
            if isinstance(imgs, Exception):
                log.error("request %s could not be decoded: %r", e.id, imgs)
                output.outcomes[e.id] = Outcome(error=as_generation_error(imgs))
            else:
                info = BatchInfo(id=e.run_id, size=e.peak_rows, requests=e.peak_requests)
                output.outcomes[e.id] = Outcome(imgs, info, e.started_at, time.perf_counter() - e.admitted_at)
            e.denoising = None  # the latents are no longer needed
            e.decoding = False
        pipeline = self._pipeline()
        if pipeline.upscaler.runs_on_device:
            pipeline.upscale_on_device(output)
        self._leave(done)  # records the run when it ends, before the results go out
        self.executor.hand_over(output, t0, record=False)  # the run is the batch

    def _decode_each(self, engine: StepEngine, states: list[RequestState],
                     exc: Exception) -> list[list[Any] | Exception]:
        """After ``exc`` broke their decode together: each state decoded alone, so only
        the culprit fails (raises ``DeviceLost`` where ``exc`` left the device unusable)."""
        exc.__traceback__ = None
        _raise_if_lost(engine, exc)
        self._pipeline().release_memory()
        return [self._decode_alone(engine, e) for e in states]

    def _decode_alone(self, engine: StepEngine, state: RequestState) -> list[Any] | Exception:
        """``state``'s images, or why it cannot be decoded (raises only for a lost device)."""
        try:
            return engine.decode([state.denoising])[0]
        except Exception as exc:  # noqa: BLE001 - this request fails alone
            exc.__traceback__ = None
            _raise_if_lost(engine, exc)
            return exc

    def _fail(self, states: list[RequestState], error: Exception) -> None:
        """End requests with ``error`` on the finishing thread (stored, then acked)."""
        self._leave(states)
        for e in states:
            e.denoising = None
        self.executor.hand_over(StepOutput.failed(states, error), time.perf_counter(), record=False)


def _ended_step_seconds(engine: StepEngine, wait: bool = False) -> list[float] | None:
    """The engine's report of calls the device has finished (None: its calls end
    when ``step`` returns, so the host's clock times them); ``wait``: all of them."""
    report = getattr(engine, "ended_step_seconds", None)
    return report(wait) if report is not None else None


def _raise_if_lost(engine: StepEngine, exc: Exception) -> None:
    """Raise ``DeviceLost`` when ``exc`` left the device unusable; else return, and
    the caller handles ``exc`` as the failure of the requests it ran."""
    lost = lost_device(engine, exc)
    if lost is not None:
        raise lost from None
