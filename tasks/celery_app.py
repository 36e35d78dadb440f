"""Celery application factory. All worker behaviour comes from configuration
here, so that a bare ``celery -A tasks worker`` is a correct batching worker."""
from __future__ import annotations

from celery import Celery

from imagegenx.celery_client import celery_config, client_app, restore_interval_s, worker_queues
from imagegenx.settings import Settings, get_settings

__all__ = ["app", "celery_config", "create_celery_app", "restore_interval_s"]


def create_celery_app(settings: Settings | None = None) -> Celery:
    # A worker runs one served model (worker_model, default the first) and consumes its queue.
    settings = (settings or get_settings()).for_model()
    app = client_app(settings)
    app.conf.task_queues = worker_queues(settings)
    import workers.control  # noqa: F401 - remote-control commands, known to clients too
    from workers.bootstep import BatchingWorkerStep, ConnectionLossStep
    from workers.message_guard import UnknownTaskStep

    app.steps["worker"].add(BatchingWorkerStep)
    app.steps["consumer"].add(ConnectionLossStep)
    app.steps["consumer"].add(UnknownTaskStep)
    return app


app = create_celery_app()
