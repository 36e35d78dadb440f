"""The ``imagegenx.deliver_webhook`` task: POST a task's status (finished, or
started / progress when asked) to its ``callback_url``, signed, retried with
exponential backoff, every attempt recorded.

It runs on its own queue (``webhook_queue``, default ``<queue>.webhooks``),
which a bare ``celery -A tasks worker`` consumes along with the generation
queue. Retries are Celery's own (``Task.retry`` with a countdown). Each delivery
has its own id (``delivery_id``: the task id for the completion, which
``GET /api/v1/tasks/<id>`` shows as ``webhook``; ``<task id>:started:0`` and
``<task id>:progress:<step>`` for the events ``callback_events`` asks for), its
own record under ``imagegenx:webhook:<delivery id>`` in the broker's Redis and its
own retries; it is sent as ``X-ImageGenX-Delivery``.
"""
from __future__ import annotations

import logging
import time
from typing import Any

from celery import Task

from imagegenx.celery_client import WEBHOOK_TASK
from imagegenx.settings import Settings
from imagegenx.webhook_queue import delivery_record, enqueue_delivery
from imagegenx.webhooks import (
    AllowList, DeliveryError, WebhookRefused, backoff_s, encode_body, post, signed_headers, vet,
)
from tasks.celery_app import app

__all__ = ["WEBHOOK_TASK", "deliver_webhook", "delivery_record", "enqueue_delivery"]
log = logging.getLogger(__name__)

@app.task(name=WEBHOOK_TASK, bind=True, acks_late=True, ignore_result=True,
          Strategy="workers.message_guard:guarded_default_strategy")
def deliver_webhook(self: Task, task_id: str, url: str, payload: dict[str, Any],
                    delivery_id: str | None = None) -> str:
    settings: Settings = self.app.imagegenx_settings
    # One record per delivery: the task id for the completion, task:event:n otherwise.
    delivery = delivery_id or task_id
    record = delivery_record(settings)
    attempt = self.request.retries + 1
    secret = settings.webhook_secret.get_secret_value()
    if not secret:
        record.update(delivery, "refused", reason="no webhook secret is configured on the worker")
        log.warning("webhook of %s refused: no webhook secret configured", delivery)
        return "refused"
    started = time.time()
    t0 = time.perf_counter()
    status: int | None = None
    try:
        target = vet(url, AllowList.parse(settings.webhook_allow_hosts))
        body = encode_body(payload)
        status = post(target, body, signed_headers(secret, body, delivery), settings.webhook_timeout_s)
    except WebhookRefused as exc:
        log.warning("webhook of %s refused: %s", delivery, exc)
        record.update(delivery, "refused", reason=str(exc))
        return "refused"
    except DeliveryError as exc:
        entry = {"at": started, "status_code": exc.status, "error": str(exc),
                 "duration_ms": (time.perf_counter() - t0) * 1000.0}
        if exc.retryable and attempt < settings.webhook_max_attempts:
            delay = backoff_s(self.request.retries, settings.webhook_backoff_s,
                              settings.webhook_backoff_max_s)
            record.update(delivery, "retrying", entry, reason=str(exc))
            log.info("webhook of %s: attempt %d failed (%s); retrying in %.1f s",
                     delivery, attempt, exc, delay)
            raise self.retry(countdown=delay, max_retries=settings.webhook_max_attempts) from None
        reason = str(exc) if not exc.retryable else f"gave up after {attempt} attempts: {exc}"
        record.update(delivery, "failed", entry, reason=reason)
        log.warning("webhook of %s failed: %s", delivery, reason)
        return "failed"
    entry = {"at": started, "status_code": status, "error": None,
             "duration_ms": (time.perf_counter() - t0) * 1000.0}
    record.update(delivery, "delivered", entry)
    log.info("webhook of %s delivered (attempt %d, status %d)", delivery, attempt, status)
    return "delivered"
