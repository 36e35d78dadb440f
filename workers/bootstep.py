"""Worker bootstep: load the engine before the consumer takes work; on warm
shutdown finish the running batch and give buffered messages back at once."""
from __future__ import annotations

import logging
from typing import Any

from celery import bootsteps
from celery.worker import state as worker_state

log = logging.getLogger(__name__)


class BatchingWorkerStep(bootsteps.StartStopStep):
    """Owns the WorkerRuntime for the lifetime of the worker process."""

    requires = ("celery.worker.components:Pool",)
    label = "imagegenx batching"

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        super().__init__(worker, **kwargs)
        self.runtime: Any = None

    def create(self, worker: Any) -> "BatchingWorkerStep":
        return self

    def start(self, worker: Any) -> None:
        from workers.runtime import WorkerRuntime

        self.runtime = WorkerRuntime(worker.app.imagegenx_settings, hostname=worker.hostname)
        self.runtime.start()

    def info(self, worker: Any) -> dict[str, Any]:
        """Shown by ``celery inspect stats`` under "batching"."""
        return {"batching": self.runtime.describe() if self.runtime else None}

    def stop(self, worker: Any) -> None:
        self._shutdown()

    def terminate(self, worker: Any) -> None:
        self._shutdown()

    def _shutdown(self) -> None:
        if self.runtime is None:
            return
        runtime, self.runtime = self.runtime, None
        leftovers = runtime.stop()
        for entry in leftovers:
            try:
                worker_state.task_ready(entry.req)
                entry.req.reject(requeue=True)
            except Exception:  # noqa: BLE001 - broker gone: redelivered after visibility timeout
                log.exception("could not requeue %s", entry.req.id)
        if leftovers:
            log.info("requeued %d buffered requests", len(leftovers))
