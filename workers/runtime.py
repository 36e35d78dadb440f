"""Per-process worker runtime: the engine, the batch runner and the executor.

Created by the worker bootstep before the consumer starts, used by the task
strategy for every received message.
"""
from __future__ import annotations

import logging
import time
from typing import Any

from celery import states
from celery.worker import state as worker_state
from celery.worker.request import Request
from pydantic import ValidationError

from imagegenx.batching import BatchPolicy
from imagegenx.engine import Engine, create_engine
from imagegenx.errors import GenerationError
from imagegenx.pipeline import BatchPipeline, Job, batch_key, resolve_request
from imagegenx.schemas import GenerateRequest
from imagegenx.settings import Settings
from imagegenx.storage import LocalStorage
from workers.executor import BatchExecutor, BatchStats, Entry
from workers.runner import BatchRunner

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
        self.executor = BatchExecutor(self._get_pipeline, settings.progress_interval_s, self.stats)
        self.runner: BatchRunner[Entry] = BatchRunner(
            BatchPolicy(settings.max_batch, settings.max_wait_s), self.executor, setup=self._load
        )

    # -- lifecycle -----------------------------------------------------------
    def start(self) -> None:
        global _current
        self.runner.start()
        _current = self

    def stop(self) -> list[Entry]:
        """Finish the running batch; hand back buffered entries for requeueing."""
        global _current
        leftovers = self.runner.stop()
        if _current is self:
            _current = None
        return leftovers

    def _load(self) -> None:
        s = self.settings
        t0 = time.perf_counter()
        self.engine = create_engine(s.engine, s.model, s.device, s.dtype, s.synthetic_cost,
                                    compile=s.compile, cuda_graphs=s.cuda_graphs,
                                    batch_buckets=s.batch_buckets)
        t_loaded = time.perf_counter()
        # Compile and capture (GPU fast path) now, before the worker takes work.
        warmup = getattr(self.engine, "warmup", None)
        if callable(warmup):
            warmup()
        self.pipeline = BatchPipeline(
            self.engine, LocalStorage(s.storage_root), s.public_base, s.served_model_name
        )
        self.warmup_s = time.perf_counter() - t0
        log.info("engine %s ready in %.2f s (load %.2f s, warm-up %.2f s; native size %s)",
                 self.engine.name, self.warmup_s, t_loaded - t0, self.warmup_s - (t_loaded - t0),
                 self.engine.native_size)

    def _get_pipeline(self) -> BatchPipeline:
        assert self.pipeline is not None
        return self.pipeline

    # -- consumer thread -----------------------------------------------------
    def submit(self, req: Request) -> None:
        """Validate a received request and buffer it for batching."""
        assert self.engine is not None
        try:
            request = GenerateRequest.model_validate(
                req.kwargs, context={"limits": self.settings.limits}
            )
            if request.sampler.value not in self.engine.samplers:
                raise GenerationError(f"sampler {request.sampler.value!r} is not supported")
        except (ValidationError, GenerationError) as exc:
            self.reject_invalid(req, exc)
            return
        if self._revoked_in_backend(req):
            return
        request = resolve_request(request, self.engine.native_size)
        job = Job(id=req.id, request=request)
        req.task.backend.store_result(
            req.id, {"hostname": req.hostname, "received_at": job.received_at},
            states.RECEIVED, request=req._context,
        )
        self.runner.add(Entry(req, job, request.num_images),
                        batch_key(request, self.settings.served_model_name),
                        request.num_images)

    @staticmethod
    def _revoked_in_backend(req: Request) -> bool:
        """A request revoked while this worker was not listening (e.g. before it
        started) is known only to the result backend: honour it there too."""
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
    def describe(self) -> dict[str, Any]:
        buffered, running = self.runner.snapshot()
        return {
            "engine": self.engine.name if self.engine else None,
            "model": self.settings.served_model_name,
            "max_batch": self.runner.policy.max_batch,
            "max_wait_ms": self.runner.policy.max_wait * 1000.0,
            "buffered_requests": len(buffered),
            "running_requests": len(running),
            "warmup_s": self.warmup_s,
            **self.stats.as_dict(),
        }
