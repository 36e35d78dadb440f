"""Rejects a task message that cannot become a request instead of letting it stop
the worker.

Celery's consumer catches only ``InvalidTaskError``, ``ContentDisallowed`` and
``DecodeError`` from a task's strategy; anything else (a body that is not
``[args, kwargs, embed]``, an ``id`` of the wrong type...) ends the worker with
"Unrecoverable error", and the message, never acknowledged, kills the next
worker too. ``guard`` wraps a strategy's message handler: it checks the
message first (``workers.message_checks``) and turns every failure to build
the request into ``InvalidTaskError``, which Celery's consumer logs once and
rejects without requeue (on Redis: removed from the queue). When the message
has a usable task id, its FAILURE is stored first, so a client polling that id
gets the reason. Undecodable bodies keep Celery's own handling (logged,
acknowledged); a disallowed content type (pickle) is refused unread and no
result is stored for it.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from typing import Any

from celery import bootsteps, states
from celery.app.task import Task
from celery.exceptions import InvalidTaskError
from celery.worker.strategy import default, hybrid_to_proto2, proto1_to_proto2
from kombu.exceptions import ContentDisallowed, DecodeError

from workers.message_checks import check_body, check_eta, check_headers, usable_task_id

log = logging.getLogger(__name__)

Handler = Callable[..., Any]


def to_proto2(message: Any, body: Any, utc: bool) -> tuple[Any, Mapping[str, Any], bool, bool]:
    """``(body, headers, decoded, utc)`` of any message protocol, as Celery's
    default strategy derives them."""
    if body is None and "args" not in message.payload:
        return message.body, message.headers, False, utc
    if "args" in message.payload:
        return hybrid_to_proto2(message, message.payload)
    return proto1_to_proto2(message, body)


def guard(task: Task, app: Any, handler: Handler, eta_horizon_s: float) -> Handler:
    """``handler`` for well-formed messages; every other one is rejected alone."""

    def guarded_handler(message: Any, body: Any, ack: Any, reject: Any, callbacks: Any,
                        **kwargs: Any) -> Any:
        headers: Any = message.headers
        try:
            decoded_body, headers, decoded, _ = to_proto2(message, body, app.uses_utc_timezone())
            check_headers(headers)
            check_body(decoded_body if decoded else message.payload)
            check_eta(headers, datetime.now(timezone.utc), eta_horizon_s)
            return handler(message, body, ack, reject, callbacks, **kwargs)
        except ContentDisallowed:
            raise  # refused unread by the consumer; nothing is stored for it
        except DecodeError as exc:
            _store_failure(task, headers, failure_reason(headers, f"undecodable body: {exc}"))
            raise  # the consumer logs it and acknowledges the message
        except Exception as exc:  # noqa: BLE001 - any of them would stop the worker
            raise refusal(task, headers, exc) from exc

    return guarded_handler


def refusal(task: Task, headers: Any, exc: BaseException) -> InvalidTaskError:
    """The error the consumer rejects the message with; stored as the task's
    FAILURE when the message has a usable id."""
    reason = exc.args[0] if isinstance(exc, InvalidTaskError) and exc.args else exc
    error = InvalidTaskError(failure_reason(headers, reason))
    _store_failure(task, headers, str(error))
    return error


def failure_reason(headers: Any, reason: object) -> str:
    return f"malformed message {usable_task_id(headers) or '(no id)'}: {reason}"


def _store_failure(task: Task, headers: Any, reason: str) -> None:
    """Store FAILURE under the message's id, unless that id already has a state
    (a real task's id reused by a bad message must not end that task)."""
    task_id = usable_task_id(headers)
    if task_id is None:
        return
    try:
        if task.backend.get_task_meta(task_id, cache=False).get("status") != states.PENDING:
            return
        task.backend.mark_as_failure(task_id, InvalidTaskError(reason), call_errbacks=False)
    except Exception as exc:  # noqa: BLE001 - the message is rejected either way
        log.warning("could not store the failure of malformed message %s: %r", task_id, exc)


def guarded_default_strategy(task: Task, app: Any, consumer: Any, **kwargs: Any) -> Handler:
    """Celery's default strategy (ETA via the consumer's timer, rate limits),
    guarded. An eta may be up to the visibility timeout away: webhook retries
    wait at most ``webhook_backoff_max_s``, which settings keep below it."""
    horizon = float(app.imagegenx_settings.visibility_timeout_s)
    return guard(task, app, default(task, app, consumer, **kwargs), horizon)


class UnknownTaskStep(bootsteps.StartStopStep):
    """Consumer bootstep: a message naming an unregistered task is rejected even
    when Celery's own handler fails on it.

    ``Consumer.on_unknown_task`` reads the task id from the headers, or else
    from the body as a mapping; a message with neither raises there and stops
    the worker. The consumer builds its message handler from these attributes
    each time its loop starts, so wrapping the bound method here is enough.
    """

    requires = ("celery.worker.consumer.tasks:Tasks",)
    label = "imagegenx unknown task guard"

    def __init__(self, c: Any, **kwargs: Any) -> None:
        super().__init__(c, **kwargs)
        celery_handler = c.on_unknown_task

        def on_unknown_task(body: Any, message: Any, exc: BaseException) -> None:
            try:
                celery_handler(body, message, exc)
            except Exception as err:  # noqa: BLE001 - it would stop the worker
                headers = message.headers if isinstance(message.headers, Mapping) else {}
                log.error("rejected message of unregistered task %r (%s): %r",
                          headers.get("task"), usable_task_id(headers) or "no id", err)
                if not message.acknowledged:
                    message.reject_log_error(log, c.connection_errors)

        c.on_unknown_task = on_unknown_task
