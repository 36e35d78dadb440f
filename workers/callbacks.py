"""What watchers of a request hear from the worker: its event stream
(``imagegenx.task_events``, read by ``GET /api/v1/tasks/<id>/events``) and its
webhooks (``callback_url`` with the ``callback_events`` it asked for).

Nothing here raises: events and webhooks must not change a request's outcome.
"""
from __future__ import annotations

import logging
import time
from typing import Any

from celery.worker.request import Request

from imagegenx import task_events, webhook_events

log = logging.getLogger(__name__)

_throttle = webhook_events.ProgressThrottle()


def _publish(req: Request, events: list[tuple[str, dict[str, Any]]]) -> None:
    _publish_batch([(req, events)])


def _publish_batch(batch: list[tuple[Request, list[tuple[str, dict[str, Any]]]]]) -> None:
    try:
        settings = getattr(batch[0][0].task.app, "imagegenx_settings", None) if batch else None
        if settings is not None:  # an app without settings (tests' fakes) has no stream
            task_events.event_log(settings).publish_batch([(r.id, ev) for r, ev in batch])
    except Exception:  # noqa: BLE001
        log.exception("could not publish the events of %d requests", len(batch))


def _webhook(req: Request, event: str, payload: dict[str, Any], sequence: int = 0) -> None:
    """Queue the delivery of ``event`` to the request's ``callback_url`` when it asked for it."""
    from imagegenx.webhook_queue import enqueue_event

    kwargs = req.kwargs or {}
    celery_app = req.task.app
    enqueue_event(celery_app, celery_app.imagegenx_settings, req.id, kwargs.get("callback_url"),
                  kwargs.get("callback_events"), event, payload, sequence)


def started(req: Request, info: dict[str, Any]) -> None:
    """STARTED is stored: the ``started`` event and webhook."""
    _publish(req, [("started", info)])
    try:
        from imagegenx.webhooks import payload

        _webhook(req, "started", payload(req.id, "STARTED", event="started"))
    except Exception:  # noqa: BLE001
        log.exception("could not queue the started webhook of %s", req.id)


def progress_many(items: list[tuple[Request, dict[str, Any]]], now: float | None = None) -> None:
    """PROGRESS is stored for several requests: their events in one round trip,
    then each one's progress webhook (when asked for)."""
    _publish_batch([(req, task_events.split_progress(data)) for req, data in items])
    for req, data in items:
        _progress_webhook(req, data, now)


def progress(req: Request, data: dict[str, Any], now: float | None = None) -> None:
    """PROGRESS is stored: ``progress`` (and ``preview``) events; a progress
    webhook at most every 500 ms per task."""
    _publish(req, task_events.split_progress(data))
    _progress_webhook(req, data, now)


def _progress_webhook(req: Request, data: dict[str, Any], now: float | None) -> None:
    try:
        kwargs = req.kwargs or {}
        if not kwargs.get("callback_url") or not webhook_events.wanted(
                kwargs.get("callback_events"), "progress"):
            return
        if not _throttle.due(req.id, time.monotonic() if now is None else now):
            return
        from imagegenx.webhooks import payload

        step = {"step": data.get("step"), "total": data.get("total")}
        _webhook(req, "progress", payload(req.id, "PROGRESS", event="progress", progress=step),
                 sequence=int(step.get("step") or 0))
    except Exception:  # noqa: BLE001
        log.exception("could not queue the progress webhook of %s", req.id)


def notify(req: Request, state: str, result: dict[str, Any] | None = None,
           error: BaseException | None = None) -> None:
    """SUCCESS or FAILURE is stored: the terminal event, and the completion webhook
    (``completed`` is the default of ``callback_events``)."""
    _throttle.forget(req.id)
    _publish(req, [(task_events.STATE_EVENT.get(state, "failed"), {"state": state})])
    try:
        from imagegenx.webhooks import payload

        _webhook(req, "completed", payload(req.id, state, result, error))
    except Exception:  # noqa: BLE001
        log.exception("could not queue the webhook of %s", req.id)


def revoked(req: Request) -> None:
    """REVOKED is stored: the terminal ``revoked`` event."""
    _throttle.forget(req.id)
    _publish(req, [("revoked", {"state": "REVOKED"})])
