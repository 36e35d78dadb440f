"""After a request's SUCCESS or FAILURE is stored: queue its webhook, if it has one."""
from __future__ import annotations

import logging
from typing import Any

from celery.worker.request import Request

log = logging.getLogger(__name__)


def notify(req: Request, state: str, result: dict[str, Any] | None = None,
           error: BaseException | None = None) -> None:
    """Queue the delivery of the request's ``callback_url`` (no-op without one).

    Never raises: a webhook problem must not change the request's outcome.
    """
    try:
        url = (req.kwargs or {}).get("callback_url")
        if not url:
            return
        from imagegenx.webhooks import payload
        from imagegenx.webhook_queue import enqueue_delivery

        celery_app = req.task.app
        enqueue_delivery(celery_app, celery_app.imagegenx_settings, req.id, url,
                         payload(req.id, state, result, error))
    except Exception:  # noqa: BLE001
        log.exception("could not queue the webhook of %s", req.id)
