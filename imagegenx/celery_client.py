"""The Celery configuration derived from ``Settings``, and a client app.

Both sides of the queue use the same configuration. The API (and any client)
builds a plain app from it, so it sends tasks, revokes, inspects and asks
workers without importing the worker's code (``tasks``, ``workers``); the
worker's app (``tasks.celery_app``) adds its bootsteps, task strategies and
control commands on top.
"""
from __future__ import annotations

from celery import Celery
from kombu import Exchange, Queue

from imagegenx.result_backend import backend_url
from imagegenx.settings import Settings

# Task names: the contract between the API, the worker and the webhook queue.
GENERATE_TASK = "imagegenx.generate"
WEBHOOK_TASK = "imagegenx.deliver_webhook"


def _queue(name: str) -> Queue:
    return Queue(name, Exchange(name), routing_key=name)


def worker_queues(settings: Settings) -> list[Queue]:
    """What one worker consumes: its model's queue and the webhook queue."""
    return [_queue(settings.queue_for(settings.worker_model or settings.default_model)),
            _queue(settings.webhook_queue_name)]


def celery_config(settings: Settings) -> dict[str, object]:
    """Celery settings derived from ours."""
    return {
        "broker_url": settings.broker_url,
        # Redis result writes never replace a SUCCESS, atomically (imagegenx.result_backend).
        "result_backend": backend_url(settings.result_backend),
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
        "task_default_queue": settings.queue_for(settings.default_model),
        # One queue per served model (the API sends each request to its model's);
        # a worker's app narrows this to its own model's (worker_queues). A bare
        # worker consumes that one and the webhook queue. Webhook deliveries run in
        # the worker's pool thread, which the batching path (own model thread)
        # leaves idle; a separate worker can take them with -Q <webhook queue>.
        "task_queues": [_queue(name) for name in
                        (*settings.generation_queues.values(), settings.webhook_queue_name)],
        "task_routes": {GENERATE_TASK: {"queue": settings.queue_for(settings.default_model)},
                        WEBHOOK_TASK: {"queue": settings.webhook_queue_name}},
        # Messages stay unacknowledged while buffered and while their batch
        # runs: the visibility timeout must cover both, or tasks run twice.
        # A lost worker's messages are put back by a live worker's periodic
        # sweep: every restore_interval_s, with no extra throttle, so they
        # return at most that long after the visibility timeout. Socket
        # timeouts keep a broker that stops answering from hanging a publish
        # or an ack (BRPOP waits 1 s, well within them).
        "broker_transport_options": {
            **({"master_name": settings.sentinel_master} if settings.sentinel_master else {}),
            "visibility_timeout": settings.visibility_timeout_s,
            "unacked_restore_interval": restore_interval_s(settings),
            "unacked_restore_throttle": 1,
            # The sweep holds a lock in Redis; a worker killed inside a sweep
            # leaves it behind until it expires (kombu's default: 300 s, five
            # minutes without any redelivery). A sweep takes milliseconds, and
            # restoring a message is one transaction, so a short expiry is safe.
            "unacked_mutex_expire": SWEEP_LOCK_EXPIRE_S,
            "socket_connect_timeout": 2.0,
            "socket_timeout": 10.0,
        },
        "redis_socket_connect_timeout": 2.0,
        "redis_socket_timeout": 10.0,
        "result_backend_transport_options": {
            "visibility_timeout": settings.visibility_timeout_s,
            **({"master_name": settings.sentinel_master} if settings.sentinel_master else {}),
        },
        "broker_connection_retry_on_startup": True,
        # On a lost broker connection the running batch goes on and stores its
        # results; its acks go out once the consumer has reconnected (the
        # buffered requests are dropped: workers.bootstep.ConnectionLossStep).
        "worker_cancel_long_running_tasks_on_connection_loss": False,
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


# Seconds a dead worker's sweep lock can delay redelivery (see broker_transport_options).
SWEEP_LOCK_EXPIRE_S = 5


def restore_interval_s(settings: Settings) -> int:
    """Seconds between sweeps for messages past their visibility timeout."""
    return max(1, min(10, settings.visibility_timeout_s // 10))


def client_app(settings: Settings) -> Celery:
    """A Celery app configured like the workers' but holding none of their code."""
    app = Celery("imagegenx", set_as_current=False)
    app.conf.update(celery_config(settings))
    app.imagegenx_settings = settings  # type: ignore[attr-defined]
    return app
