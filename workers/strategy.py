"""Task strategy for ``imagegenx.generate``: every message goes to the batch buffer.

Mirrors Celery's default strategy (request object, revocation and expiry
checks, ``task-received`` event, worker-state registration) but, instead of
sending each request to the pool, hands it to the batching runtime. A message
that cannot become a request is rejected alone (``workers.message_guard``).

A request with an ``eta`` waits in the consumer's timer, as Celery's default
strategy does (the prefetch window grows by one meanwhile, and ``celery
inspect scheduled`` lists it), then joins the buffer. Its message stays
unacknowledged while it waits, unrefreshed by the lease keeper, so an eta may
be at most ``visibility_timeout_s`` minus the longest buffer and batch time
(``worst_wait_s``) away; a later one is refused with FAILURE.
"""
from __future__ import annotations

import logging
from typing import Any

from celery import signals, states
from celery.app.task import Task
from celery.utils.imports import symbol_by_name
from celery.utils.time import timezone
from celery.worker.request import Request, create_request_cls
from celery.worker.state import task_reserved, task_scheduled
from kombu.asynchronous.timer import to_timestamp

from workers.message_guard import guard, to_proto2
from workers.runtime import current_runtime

log = logging.getLogger(__name__)


def batching_strategy(task: Task, app: Any, consumer: Any, **_: Any) -> Any:
    runtime = current_runtime()
    settings = app.imagegenx_settings
    hostname = consumer.hostname
    eventer = consumer.event_dispatcher
    send_event = eventer.send if eventer and eventer.enabled and task.send_events else None
    Req = create_request_cls(symbol_by_name(task.Request), task, consumer.pool, hostname,
                             eventer, app=app)
    revoked_tasks = consumer.controller.state.revoked
    connection_errors = consumer.connection_errors

    def gone(req: Request) -> bool:
        """Revoked or expired: ``req.revoked()`` has acknowledged it as REVOKED."""
        if (req.expires or req.id in revoked_tasks) and req.revoked():
            runtime.stats.record_outcome(states.REVOKED)
            return True
        return False

    def admit_at_eta(req: Request) -> None:
        consumer.qos.decrement_eventually()
        if not gone(req):
            task_reserved(req)
            runtime.submit(req)

    def task_message_handler(message: Any, body: Any, ack: Any, reject: Any, callbacks: Any,
                             **kwargs: Any) -> None:
        body, headers, decoded, utc = to_proto2(message, body, app.uses_utc_timezone())
        req = Req(message, on_ack=ack, on_reject=reject, app=app, hostname=hostname,
                  eventer=eventer, task=task, connection_errors=connection_errors,
                  body=body, headers=headers, decoded=decoded, utc=utc)
        log.debug("received %s", req.id)
        if gone(req):
            return
        signals.task_received.send(sender=consumer, request=req)
        if send_event is not None:
            send_event("task-received", uuid=req.id, name=req.name, args=req.argsrepr,
                       kwargs=req.kwargsrepr, root_id=req.root_id, parent_id=req.parent_id,
                       retries=req.request_dict.get("retries", 0),
                       eta=req.eta and req.eta.isoformat(),
                       expires=req.expires and req.expires.isoformat())
        if req.eta:
            eta = (to_timestamp(timezone.to_system(req.eta)) if req.utc
                   else to_timestamp(req.eta, app.timezone))
            consumer.qos.increment_eventually()
            req._eta_timer_entry = consumer.timer.call_at(eta, admit_at_eta, (req,), priority=6)
            task_scheduled(req)
            return
        task_reserved(req)
        runtime.submit(req)

    horizon = settings.visibility_timeout_s - settings.worst_wait_s
    return guard(task, app, task_message_handler, horizon)
