"""Per-process worker runtime: the engine, the model thread and the executor.

Created by the worker bootstep before the consumer starts, used by the task
strategy for every received message.

Threads, and what each one owns:

- **Consumer (Celery's main thread)**: receives messages (``workers.strategy``),
  validates them and adds them to the waiting pool (``submit``); runs remote
  control, heartbeats and the event loop that sends acks. It never touches the
  engine. On shutdown and on a lost connection it takes the waiting pool back.
- **Model thread** (``StepRunner`` or ``BatchRunner``, one ``WorkerState``):
  loads and warms the engine, then owns it and every trajectory: schedules,
  runs the UNet calls and decodes. The waiting pool and the running set are
  shared with the consumer under the runner's lock; nothing else is.
- **Finishing thread** (``workers.finisher``): renders, stores, writes each
  request's result, queues its webhook and acks, for what the model thread
  hands over (bounded: the model thread blocks when it is a batch behind).
- **Lease keeper** (``workers.leases``): refreshes the delivery time of every
  message held (waiting, running, finishing) so none passes the visibility timeout.
- **Metrics server** (optional): reads snapshots under the runner's lock.

Hand-overs: consumer -> model thread through ``runner.add``; model thread ->
finishing thread through ``executor.hand_over``; the finishing thread schedules
acks on the consumer's event loop (Celery's ``Request.acknowledge``).
"""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import Any

from celery import states
from celery.worker import state as worker_state
from celery.worker.request import Request
from pydantic import ValidationError

from imagegenx.batching import BatchPolicy
from imagegenx.engine import Engine
from imagegenx.engine.base import is_step_engine
from imagegenx.errors import GenerationError
from imagegenx.gpu import GpuStat, visible_gpus
from imagegenx.lora_catalog import LoraCatalog
from imagegenx.pipeline import BatchPipeline, batch_key, resolve_request, step_group
from imagegenx.pipeline_factory import build_pipeline
from imagegenx.request_state import RequestState
from imagegenx.schemas import TENANT_HEADER, GenerateRequest
from imagegenx.settings import Settings
from imagegenx.step_scheduler import StepScheduler
from workers.deliveries import Deliveries, DeliveryLedger
from workers.executor import BatchExecutor, BatchStats
from workers.leases import LeaseKeeper
from workers.model_thread import WorkerState
from workers.runner import BatchRunner
from workers.step_runner import StepRunner

log = logging.getLogger(__name__)

_current: "WorkerRuntime | None" = None


def current_runtime() -> "WorkerRuntime":
    if _current is None:
        raise RuntimeError("the batching worker runtime is not started (BatchingWorkerStep missing?)")
    return _current


class WorkerRuntime:
    def __init__(self, settings: Settings, hostname: str = "") -> None:
        self.settings = settings
        self.hostname = hostname
        self.engine: Engine | None = None
        self.pipeline: BatchPipeline | None = None
        self.stats = BatchStats()
        self.warmup_s = 0.0
        self.metrics: Any = None
        self._metrics_server: Any = None
        if settings.worker_metrics_port:
            from workers.metrics import WorkerMetrics

            self.metrics = WorkerMetrics()
            self.stats.metrics = self.metrics
            self.metrics.watch(self.runner_snapshot, self.gpus, self._identity)
        self.ledger = DeliveryLedger.from_url(settings.broker_url, settings.result_expires_s,
                                              settings.sentinel_master)
        self.executor = BatchExecutor(self._get_pipeline, settings.progress_interval_s, self.stats,
                                      ledger=self.ledger)
        self.runner: BatchRunner[RequestState] | StepRunner
        if settings.scheduler == "step":
            self.runner = StepRunner(
                # The scheduler counts UNet rows: max_batch images with guidance on every step.
                StepScheduler(2 * settings.max_batch, settings.max_wait_s,
                              max_priority=settings.max_priority,
                              priority_age_s=settings.priority_age_s,
                              admit_delay=settings.admit_delay_ms / 1000.0,
                              order=settings.step_order, min_gain=settings.step_min_gain),
                self.executor, self._get_pipeline, setup=self._load,
            )
        else:
            self.runner = BatchRunner(BatchPolicy(settings.max_batch, settings.max_wait_s),
                                      self.executor, setup=self._load)
        self.runner.on_fault = self._exit_on_fault
        # Held messages (buffered or running) never reach the visibility timeout.
        self.leases = (LeaseKeeper(self.ledger.client, self._held, settings.visibility_timeout_s)
                       if self.ledger is not None else None)

    # -- lifecycle -----------------------------------------------------------
    @staticmethod
    def _exit_on_fault(reason: str) -> None:
        """The model thread lost the device: warm shutdown with exit status 70
        (EX_SOFTWARE), Celery's own flag, read by the consumer's event loop. The
        bootstep's ``stop`` then gives every held request back to the queue, and the
        process supervisor (systemd, Kubernetes, ``imagegenx worker --gpus``) starts a
        fresh worker on the device."""
        worker_state.should_stop = os.EX_SOFTWARE

    def start(self) -> None:
        global _current
        if self.metrics is not None:  # up during the warm-up too
            self._metrics_server = self.metrics.serve(self.settings.worker_metrics_port,
                                                      self.settings.worker_metrics_host)
        try:
            self.runner.start()
        except BaseException:
            self._stop_metrics()
            raise
        if self.leases is not None:
            self.leases.start()
        _current = self

    def stop(self, requeue: Callable[[list[RequestState]], None] | None = None) -> list[RequestState]:
        """Take no more batches, hand the buffered requests to ``requeue`` at once,
        then let the running batch finish, and every step output be stored,
        reported and acknowledged. Returns the buffered requests.

        A device lost while the running batch finishes puts its requests back in
        waiting after the first ``close``: a second one hands them over too."""
        global _current
        leftovers = self.runner.close()
        if requeue is not None:
            requeue(leftovers)
        self.runner.join()
        if self.runner.state is WorkerState.FAULTED:
            given_back = self.runner.close()
            if requeue is not None:
                requeue(given_back)
            leftovers = leftovers + given_back
        self.executor.close()
        if self.leases is not None:
            self.leases.stop()
        if _current is self:
            _current = None
        self._stop_metrics()
        return leftovers

    def _held(self) -> list[RequestState]:
        buffered, running = self.runner.snapshot()
        return buffered + running + self.executor.finishing()

    def _stop_metrics(self) -> None:
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()
            self._metrics_server = None

    def _load(self) -> None:
        t0 = time.perf_counter()
        pipeline = build_pipeline(self.settings)
        self.engine = pipeline.engine
        if self.settings.scheduler == "step" and not is_step_engine(self.engine):
            raise RuntimeError(f"engine {self.engine.name!r} has no step API: set "
                               "IMAGEGENX_SCHEDULER=request")
        t_loaded = time.perf_counter()
        # Compile and capture (GPU fast path) now, before the worker takes work.
        warmup = getattr(self.engine, "warmup", None)
        if callable(warmup):
            warmup()
        self.pipeline = pipeline
        if isinstance(self.runner, StepRunner):
            self.runner.use_cost_model(getattr(self.engine, "step_seconds", None))
        self.warmup_s = time.perf_counter() - t0
        log.info("engine %s ready in %.2f s (load %.2f s, warm-up %.2f s; native size %s)",
                 self.engine.name, self.warmup_s, t_loaded - t0, self.warmup_s - (t_loaded - t0),
                 self.engine.native_size)

    def _get_pipeline(self) -> BatchPipeline:
        assert self.pipeline is not None
        return self.pipeline

    def drop_buffered(self) -> list[RequestState]:
        """Forget the buffered requests (their broker channel is gone; the broker
        delivers their messages again). The running batch goes on."""
        dropped = self.runner.drop_buffered()
        for state in dropped:
            worker_state.task_ready(state.delivery)
        return dropped

    # -- consumer thread -----------------------------------------------------
    def submit(self, req: Request) -> None:
        """Validate a received request and buffer it for batching."""
        assert self.engine is not None
        try:
            request = GenerateRequest.model_validate(
                req.kwargs, context={"limits": self.settings.limits}
            )
            if request.model not in (None, self.settings.served_model_name):
                raise GenerationError(f"this worker serves model {self.settings.served_model_name!r}, "
                                      f"not {request.model!r}")
            if request.sampler.value not in self.engine.samplers:
                raise GenerationError(f"sampler {request.sampler.value!r} is not supported")
            LoraCatalog(self.settings.lora_dir).require(request.lora_names())
        except (ValidationError, GenerationError) as exc:
            self.reject_invalid(req, exc)
            self.stats.record_outcome(states.FAILURE)
            return
        meta = req.task.backend.get_task_meta(req.id, cache=False)
        if self._revoked_in_backend(req, meta):
            self.stats.record_outcome(states.REVOKED)
            return
        if meta.get("status") in (states.SUCCESS, states.FAILURE):
            # Delivered again after its result was stored (its ack was lost).
            log.info("%s already finished (%s): acknowledged without running it again",
                     req.id, meta.get("status"))
            worker_state.task_ready(req)
            req.acknowledge()
            return
        deliveries = self.ledger.received(req.id) if self.ledger is not None else Deliveries()
        if deliveries.started >= self.settings.max_deliveries:
            self._give_up(req, deliveries)
            return
        request = resolve_request(request, self.engine.native_size)
        state = RequestState(req.id, request, delivery=req, redelivered=deliveries.redelivered,
                             suspect=bool(deliveries.started))
        req.task.backend.store_result(
            req.id, {"hostname": req.hostname, "received_at": state.received_at},
            states.RECEIVED, request=req._context,
        )
        step = isinstance(self.runner, StepRunner)
        key: Any = (step_group if step else batch_key)(request, self.settings.served_model_name)
        if state.suspect:
            # It ran before and its worker was lost: it runs alone, so that if it
            # is what kills workers it takes no other request down with it.
            log.warning("%s ran in %d earlier deliveries whose worker was lost: it runs alone",
                        req.id, deliveries.started)
            key = (key, req.id)
        if isinstance(self.runner, StepRunner):
            tenant = str((req.request_dict or {}).get(TENANT_HEADER) or "")
            self.runner.add(state, key, priority=request.priority, tenant=tenant)
        else:
            self.runner.add(state, key, request.num_images)

    def _give_up(self, req: Request, deliveries: Deliveries) -> None:
        error = GenerationError(
            f"gave up after {deliveries.started} deliveries: the worker was lost each time "
            "this request ran"
        )
        log.error("%s %s", req.id, error)
        self.executor.fail(req, error)

    @staticmethod
    def _revoked_in_backend(req: Request, meta: dict[str, Any] | None = None) -> bool:
        """A request revoked while this worker was not listening (e.g. before it
        started) is known only to the result backend: honour it there too."""
        if meta is None:
            meta = req.task.backend.get_task_meta(req.id, cache=False)
        if meta.get("status") != states.REVOKED:
            return False
        worker_state.revoked.add(req.id)
        return bool(req.revoked())

    @staticmethod
    def reject_invalid(req: Request, exc: Exception) -> None:
        error = GenerationError(f"invalid request: {exc}")
        req.task.backend.mark_as_failure(req.id, error, request=req._context)
        worker_state.task_ready(req)
        req.acknowledge()
        req.send_event("task-failed", exception=repr(error), traceback="")

    # -- inspection ----------------------------------------------------------
    def runner_snapshot(self) -> tuple[list[RequestState], list[RequestState]]:
        return self.runner.snapshot()

    @property
    def device(self) -> str:
        """``cuda`` or ``cpu``: where the engine runs (``cpu`` until it is loaded)."""
        return str(getattr(self.engine, "device", "cpu")).split(":")[0]

    def gpus(self) -> list[GpuStat]:
        """NVML readings of this worker's GPUs; none on the CPU or without NVML."""
        return visible_gpus() if self.device == "cuda" else []

    def _identity(self) -> dict[str, str]:
        return {"hostname": self.hostname, "engine": self.engine.name if self.engine else "",
                "model": self.settings.served_model_name, "device": self.device}

    def describe(self) -> dict[str, Any]:
        buffered, running = self.runner.snapshot()
        max_batch, max_wait = self.runner.limits()
        if isinstance(self.runner, StepRunner):
            rows = self.runner.oom_row_limit  # UNet rows: two per guided image
            oom_limit = None if rows is None else max(1, rows // 2)
        else:
            oom_limit = self.pipeline.image_limit if self.pipeline else None
        return {
            "engine": self.engine.name if self.engine else None,
            "model": self.settings.served_model_name,
            "model_version": self.pipeline.model_version if self.pipeline else None,
            "native_size": list(self.engine.native_size) if self.engine else None,
            "samplers": list(self.engine.samplers) if self.engine else [],
            "device": self.device,
            "gpus": [g.as_dict() for g in self.gpus()],
            "metrics_port": self.settings.worker_metrics_port if self._metrics_server else None,
            "scheduler": self.settings.scheduler,
            "state": self.runner.state.value,
            "fault": self.runner.fault,
            "max_batch": max_batch,
            "max_wait_ms": max_wait * 1000.0,
            "buffered_requests": len(buffered),
            "running_requests": len(running),
            "finishing_requests": len(self.executor.finishing()),
            "oom_image_limit": oom_limit,
            "warmup_s": self.warmup_s,
            **self.stats.as_dict(),
        }
