"""Celery application factory. All worker behaviour comes from configuration
here, so that a bare ``celery -A tasks worker`` is a correct batching worker."""
from __future__ import annotations

from celery import Celery

from imagegenx.settings import Settings, get_settings


def celery_config(settings: Settings) -> dict[str, object]:
    """Celery settings derived from ours."""
    return {
        "broker_url": settings.broker_url,
        "result_backend": settings.result_backend,
        # JSON only: a pickle message is refused by the worker.
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "event_serializer": "json",
        # Ack after the result is stored; a lost worker's messages are redelivered.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "task_track_started": True,
        "result_expires": settings.result_expires_s,
        "result_extended": True,
        "task_default_queue": settings.queue,
        "task_routes": {"imagegenx.generate": {"queue": settings.queue}},
        # Messages stay unacknowledged while buffered and while their batch
        # runs: the visibility timeout must cover both, or tasks run twice.
        "broker_transport_options": {"visibility_timeout": settings.visibility_timeout_s},
        "result_backend_transport_options": {"visibility_timeout": settings.visibility_timeout_s},
        "broker_connection_retry_on_startup": True,
        # One model-owning thread per worker: no fork, so CUDA never lives in
        # a forked parent. The consumer thread keeps receiving and heart-beating.
        "worker_pool": "threads",
        "worker_concurrency": 1,
        # Prefetch = buffered + running messages = prefetch_batches x max_batch.
        "worker_prefetch_multiplier": settings.prefetch,
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        "worker_hijack_root_logger": False,
    }


def create_celery_app(settings: Settings | None = None) -> Celery:
    settings = settings or get_settings()
    app = Celery("imagegenx", set_as_current=False)
    app.conf.update(celery_config(settings))
    app.imagegenx_settings = settings  # type: ignore[attr-defined]
    import workers.control  # noqa: F401 - remote-control commands, known to clients too
    from workers.bootstep import BatchingWorkerStep

    app.steps["worker"].add(BatchingWorkerStep)
    return app


app = create_celery_app()
