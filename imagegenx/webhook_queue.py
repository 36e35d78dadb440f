"""Queueing a webhook delivery: its record in Redis and the delivery task.

Lives below both the worker (which queues a finished request's webhook) and
the task module (which delivers it), so the worker sends the task by name
without importing ``tasks``.
"""
from __future__ import annotations

import threading
from typing import Any

import redis
from celery import Celery

from imagegenx import webhook_events
from imagegenx.celery_client import WEBHOOK_TASK
from imagegenx.redis_client import redis_client
from imagegenx.settings import Settings
from imagegenx.webhooks import DeliveryRecord

_clients: dict[str, redis.Redis] = {}
_clients_lock = threading.Lock()


def delivery_record(settings: Settings) -> DeliveryRecord:
    with _clients_lock:
        client = _clients.get(settings.broker_url)
        if client is None:
            client = redis_client(settings.broker_url, settings.sentinel_master,
                                  socket_connect_timeout=2, socket_timeout=5,
                                  health_check_interval=10)
            _clients[settings.broker_url] = client
    return DeliveryRecord(client, settings.result_expires_s)


def enqueue_delivery(celery_app: Celery, settings: Settings, task_id: str, url: str,
                     payload: dict[str, Any], delivery_id: str | None = None) -> None:
    """Record the delivery as queued and send the delivery task. ``delivery_id``
    (default: the task id, the completion's) keys its record and is sent as
    ``X-ImageGenX-Delivery``."""
    delivery = delivery_id or task_id
    delivery_record(settings).queued(delivery)
    kwargs: dict[str, Any] = {"task_id": task_id, "url": url, "payload": payload}
    if delivery != task_id:
        kwargs["delivery_id"] = delivery
    celery_app.send_task(WEBHOOK_TASK, kwargs=kwargs, queue=settings.webhook_queue_name)


def enqueue_event(celery_app: Celery, settings: Settings, task_id: str, url: str | None,
                  callback_events: Any, event: str, payload: dict[str, Any], sequence: int = 0) -> bool:
    """Queue ``event``'s delivery when the request has a ``callback_url`` and asked
    for the event (``callback_events``; None: completion only). True when queued."""
    if not url or not webhook_events.wanted(callback_events, event):
        return False
    enqueue_delivery(celery_app, settings, task_id, url, payload,
                     webhook_events.delivery_id(task_id, event, sequence))
    return True
