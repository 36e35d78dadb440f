"""POST /api/v1/images: validate, check the queue depth, enqueue, answer 202."""
from __future__ import annotations

import secrets
import uuid

from flask import Blueprint, jsonify, url_for
from kombu.exceptions import OperationalError
from redis.exceptions import RedisError

from imagegenx.api.cost_limits import COST_UNITS, refuse_too_costly
from imagegenx.api.errors import ApiError
from imagegenx.api.guards import json_body, require_key
from imagegenx.api.services import services
from imagegenx.cost import request_cost
from imagegenx.lora_catalog import LoraCatalog
from imagegenx.schemas import MAX_SEED, TENANT_HEADER, GenerateRequest, SubmitResponse

bp = Blueprint("images", __name__, url_prefix="/api/v1")
TASK_NAME = "imagegenx.generate"


@bp.post("/images")
def submit():  # type: ignore[no-untyped-def]
    digest = require_key()
    body = json_body()
    svc = services()
    req = GenerateRequest.model_validate(body, context={"limits": svc.settings.limits})
    if req.callback_url and not svc.settings.webhook_secret.get_secret_value():
        raise ApiError(422, "invalid request", fields=[{
            "field": "callback_url",
            "reason": "webhooks are disabled on this server (no webhook secret is configured)"}])
    # The API's lora_dir is the one served: the API host needs the same folder as the workers.
    unknown = LoraCatalog(svc.settings.lora_dir).unknown_reason(req.lora_names())
    if unknown:
        raise ApiError(422, "invalid request", fields=[{"field": "lora", "reason": unknown}])
    cost = request_cost(req, svc.settings.cost_unset_side)
    refuse_too_costly(req, cost, svc.settings)
    if req.seed is None:  # chosen here so a redelivered message draws the same image
        req = req.model_copy(update={"seed": secrets.randbelow(MAX_SEED + 1 - req.num_images)})
    task_id = str(uuid.uuid4())
    retry_after = {"Retry-After": str(svc.settings.retry_after_s)}
    try:
        limit = svc.settings.max_queue_depth
        if limit:
            # Messages not yet taken by a worker. Concurrent submissions may
            # overshoot the limit by at most the number of API threads.
            depth = svc.redis.llen(svc.settings.queue)
            if depth >= limit:
                raise ApiError(503, f"overloaded: {depth} requests are waiting (limit {limit}); "
                               "retry later", headers=retry_after, queue_depth=depth)
        svc.cost_budget.charge(digest, cost)
        svc.owners.record(task_id, digest)
        svc.celery.send_task(
            TASK_NAME,
            kwargs=req.model_dump(mode="json"),
            task_id=task_id,
            queue=svc.settings.queue,
            expires=req.timeout_s,
            retry=False,
            headers={TENANT_HEADER: digest[:16]},
        )
    except (RedisError, OperationalError, ConnectionError) as exc:
        raise ApiError(503, f"queue unavailable: {type(exc).__name__}",
                       headers=retry_after) from exc
    COST_UNITS.labels("accepted").inc(cost)
    # The configured public address, never the request's Host header (a client could set it).
    status_url = svc.settings.public_base + url_for("tasks.get_task", task_id=task_id)
    assert req.seed is not None
    resp = jsonify(SubmitResponse(task_id=task_id, status_url=status_url, seed=req.seed,
                                  cost=cost).model_dump())
    resp.status_code = 202
    resp.headers["Location"] = status_url
    return resp
