"""Task strategy for ``imagegenx.generate``: every message goes to the batch buffer.

Mirrors Celery's default strategy (request object, revocation and expiry
checks, ``task-received`` event, worker-state registration) but, instead of
sending each request to the pool, hands it to the batching runtime.
"""
from __future__ import annotations

import logging
from typing import Any

from celery import signals, states
from celery.app.task import Task
from celery.utils.imports import symbol_by_name
from celery.worker.request import create_request_cls
from celery.worker.state import task_reserved
from celery.worker.strategy import hybrid_to_proto2, proto1_to_proto2

from workers.runtime import current_runtime

log = logging.getLogger(__name__)


def batching_strategy(task: Task, app: Any, consumer: Any, **_: Any) -> Any:
    runtime = current_runtime()
    hostname = consumer.hostname
    eventer = consumer.event_dispatcher
    send_event = eventer.send if eventer and eventer.enabled and task.send_events else None
    Req = create_request_cls(symbol_by_name(task.Request), task, consumer.pool, hostname,
                             eventer, app=app)
    revoked_tasks = consumer.controller.state.revoked
    connection_errors = consumer.connection_errors

    def task_message_handler(message: Any, body: Any, ack: Any, reject: Any, callbacks: Any,
                             **kwargs: Any) -> None:
        if body is None and "args" not in message.payload:
            body, headers, decoded, utc = (message.body, message.headers, False,
                                           app.uses_utc_timezone())
        elif "args" in message.payload:
            body, headers, decoded, utc = hybrid_to_proto2(message, message.payload)
        else:
            body, headers, decoded, utc = proto1_to_proto2(message, body)
        req = Req(message, on_ack=ack, on_reject=reject, app=app, hostname=hostname,
                  eventer=eventer, task=task, connection_errors=connection_errors,
                  body=body, headers=headers, decoded=decoded, utc=utc)
        log.debug("received %s", req.id)
        if (req.expires or req.id in revoked_tasks) and req.revoked():
            runtime.stats.record_outcome(states.REVOKED)
            return
        signals.task_received.send(sender=consumer, request=req)
        if send_event is not None:
            send_event("task-received", uuid=req.id, name=req.name, args=req.argsrepr,
                       kwargs=req.kwargsrepr, root_id=req.root_id, parent_id=req.parent_id,
                       retries=req.request_dict.get("retries", 0),
                       eta=req.eta and req.eta.isoformat(),
                       expires=req.expires and req.expires.isoformat())
        task_reserved(req)
        runtime.submit(req)

    return task_message_handler
