"""GET / DELETE /api/v1/tasks/<id>: state, progress, result or error; revoke."""
from __future__ import annotations

import uuid
from typing import Any

from celery import states
from celery.exceptions import BackendError
from celery.result import AsyncResult
from flask import Blueprint, jsonify
from redis.exceptions import RedisError

from imagegenx.api.errors import ApiError
from imagegenx.api.guards import require_key
from imagegenx.api.services import Services, services
from imagegenx.schemas import TaskStatus

bp = Blueprint("tasks", __name__, url_prefix="/api/v1")


def _owned(svc: Services, task_id: str, digest: str) -> AsyncResult:
    """The task's AsyncResult if it exists and belongs to this key (else 404)."""
    try:
        uuid.UUID(task_id)
    except ValueError:
        raise ApiError(404, "no such task") from None
    try:
        owner = svc.owners.owner(task_id)
    except (RedisError, ConnectionError) as exc:  # ConnectionError: the ownership database
        raise ApiError(503, "queue unavailable",
                       headers={"Retry-After": str(svc.settings.retry_after_s)}) from exc
    if owner is None or owner != digest:
        raise ApiError(404, "no such task")
    return AsyncResult(task_id, app=svc.celery)


def describe(result: AsyncResult) -> dict[str, Any]:
    # One read of the backend: ``result.state`` and ``result.info`` read it twice,
    # and a task that moves on in between pairs a state with another state's info.
    meta = result.backend.get_task_meta(result.id)
    state = meta["status"]
    info = meta.get("result")
    body: dict[str, Any] = {"task_id": result.id, "state": state, "progress": None,
                            "result": None, "error": None}
    if state == "PROGRESS" and isinstance(info, dict):
        body["progress"] = {"step": info.get("step"), "total": info.get("total")}
        if isinstance(info.get("preview"), dict):  # the latest preview, when one was asked for
            body["progress"]["preview"] = info["preview"]
    elif state == states.SUCCESS:
        body["result"] = info
        steps = info.get("steps") if isinstance(info, dict) else None
        body["progress"] = {"step": steps, "total": steps}
    elif state in (states.FAILURE, states.REVOKED):
        body["error"] = {"type": type(info).__name__, "message": str(info)}
    return body


def status_body(svc: Services, result: AsyncResult) -> dict[str, Any]:
    """What GET /api/v1/tasks/<id> answers (raises RedisError, BackendError); the
    final event of the task's event stream carries the same."""
    body = describe(result)
    body["webhook"] = svc.webhooks.get(result.id)
    return TaskStatus.model_validate(body).model_dump(mode="json")


@bp.get("/tasks/<task_id>")
def get_task(task_id: str):  # type: ignore[no-untyped-def]
    svc = services()
    result = _owned(svc, task_id, require_key())
    try:
        return jsonify(status_body(svc, result))
    except (RedisError, BackendError) as exc:  # BackendError: a database backend that is down
        raise ApiError(503, "result backend unavailable",
                       headers={"Retry-After": str(svc.settings.retry_after_s)}) from exc


@bp.delete("/tasks/<task_id>")
def revoke_task(task_id: str):  # type: ignore[no-untyped-def]
    svc = services()
    result = _owned(svc, task_id, require_key())
    if result.state in states.READY_STATES:
        raise ApiError(409, f"task already finished ({result.state})", state=result.state)
    svc.celery.control.revoke(task_id)
    svc.celery.backend.mark_as_revoked(task_id, "revoked")
    return jsonify({"task_id": task_id, "state": states.REVOKED}), 202
