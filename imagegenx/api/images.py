"""POST /api/v1/images: validate, check the queue depth, enqueue, answer 202."""
from __future__ import annotations

import secrets
import time
import uuid
from collections.abc import Callable
from typing import Any

from celery import states
from flask import Blueprint, Response, jsonify, request, url_for
from kombu.exceptions import OperationalError
from redis.exceptions import RedisError

from imagegenx.api.cost_limits import COST_UNITS, refuse_too_costly
from imagegenx.api.errors import ApiError
from imagegenx.api.files import app_storage
from imagegenx.api.fairness import UnfinishedTasks, refuse_priority
from imagegenx.api.guards import json_body, require_key
from imagegenx.api.idempotency import HEADER as IDEMPOTENCY_HEADER
from imagegenx.api.idempotency import Claim, IdempotencyStore, body_hash, check_header
from imagegenx.api.models import refuse_without_worker, resolve
from imagegenx.api.result_cache import LOOKUPS, ResultIndex, fingerprint, reusable, wants_cache
from imagegenx.api.services import Services, services
from imagegenx.celery_client import GENERATE_TASK
from imagegenx.cost import request_cost
from imagegenx.lora_catalog import LoraCatalog
from imagegenx.scaling import SENT_AT_HEADER
from imagegenx.storage import S3Storage
from imagegenx.webhook_queue import enqueue_event
from imagegenx.webhooks import payload as webhook_payload
from imagegenx.schemas import MAX_SEED, TENANT_HEADER, GenerateRequest, SubmitResponse

bp = Blueprint("images", __name__, url_prefix="/api/v1")
TASK_NAME = GENERATE_TASK


@bp.post("/images")
def submit():  # type: ignore[no-untyped-def]
    digest = require_key()
    idem_key = check_header(request.headers.get(IDEMPOTENCY_HEADER))
    body = json_body()
    svc = services()
    req = GenerateRequest.model_validate(body, context={"limits": svc.settings.limits})
    if req.callback_url and not svc.settings.webhook_secret.get_secret_value():
        raise ApiError(422, "invalid request", fields=[{
            "field": "callback_url",
            "reason": "webhooks are disabled on this server (no webhook secret is configured)"}])
    model = resolve(svc, req.model)
    spec = svc.settings.served_models[model]
    queue = svc.settings.queue_for(model)
    # Messages name the model only when several are configured, so that a worker of
    # an earlier release (which knows no `model` field) still takes the one model's.
    req = req.model_copy(update={"model": model if svc.settings.models else None})
    # The API's lora_dir is the one served: the API host needs the same folder as the workers.
    unknown = LoraCatalog(spec.lora_dir or svc.settings.lora_dir).unknown_reason(req.lora_names())
    if unknown:
        raise ApiError(422, "invalid request", fields=[{"field": "lora", "reason": unknown}])
    refuse_priority(req.priority, digest, svc.settings)
    cost = request_cost(req, svc.settings.cost_unset_side)
    refuse_too_costly(req, cost, svc.settings)
    body_fp = body_hash(req.model_dump(mode="json"))  # before the server picks a seed
    cacheable = req.seed is not None  # only a seed the caller chose names the same pixels again
    pixels_fp = fingerprint(req, model) if cacheable else ""
    use_cache = wants_cache(req, svc.settings.result_cache)
    if req.seed is None:  # chosen here so a redelivered message draws the same image
        req = req.model_copy(update={"seed": secrets.randbelow(MAX_SEED + 1 - req.num_images)})
    task_id = str(uuid.uuid4())
    retry_after = {"Retry-After": str(svc.settings.retry_after_s)}
    assert req.seed is not None
    cached = None
    try:
        if use_cache:
            cached = _cached_result(svc, digest, pixels_fp, model)
            LOOKUPS.labels("miss" if cached is None else "hit").inc()
    except (RedisError, OperationalError, ConnectionError) as exc:
        raise ApiError(503, f"queue unavailable: {type(exc).__name__}", headers=retry_after) from exc
    claim = Claim(body_fp, task_id, req.seed, 0 if cached is not None else cost)
    idem = IdempotencyStore(svc.redis, svc.settings.result_expires_s)
    claimed = admitted = False
    unfinished = UnfinishedTasks(svc.redis, _state_reader(svc), svc.settings.max_unfinished_per_key,
                                 svc.settings.result_expires_s)
    try:
        if idem_key is not None:
            earlier = idem.claim(digest, idem_key, claim)
            if earlier is not None:
                return _replay(earlier, body_fp)
            claimed = True
        if cached is not None:  # nothing to queue or charge: the images exist
            svc.owners.record(task_id, digest)
            svc.celery.backend.store_result(task_id, cached, states.SUCCESS)
            _cached_webhook(svc, req, task_id, cached)
            return _accepted(claim, 202, cached=True)
        limit = svc.settings.max_queue_depth
        if limit or svc.settings.max_queue_without_worker:
            # Messages not yet taken by a worker. Concurrent submissions may
            # overshoot the limits by at most the number of API threads.
            depth = svc.redis.llen(queue)
            if limit and depth >= limit:
                raise ApiError(503, f"overloaded: {depth} requests are waiting (limit {limit}); "
                               "retry later", headers=retry_after, queue_depth=depth)
            refuse_without_worker(svc, model, queue, depth)
        unfinished.admit(digest, task_id, svc.settings.retry_after_s)
        admitted = True
        svc.cost_budget.charge(digest, cost)
        svc.owners.record(task_id, digest)
        svc.celery.send_task(
            TASK_NAME,
            kwargs=req.model_dump(mode="json"),
            task_id=task_id,
            queue=queue,
            expires=req.timeout_s,
            retry=False,
            headers={TENANT_HEADER: digest[:16], SENT_AT_HEADER: time.time()},
        )
    except BaseException as exc:
        if claimed:
            assert idem_key is not None
            _quietly(idem.release, digest, idem_key, claim)
        if admitted:
            _quietly(unfinished.forget, digest, task_id)
        if isinstance(exc, (RedisError, OperationalError, ConnectionError)):
            raise ApiError(503, f"queue unavailable: {type(exc).__name__}",
                           headers=retry_after) from exc
        raise
    if cacheable:  # queued: a later identical request may take its result
        _quietly(ResultIndex(svc.redis, svc.settings.result_expires_s).remember, digest, pixels_fp,
                 task_id, use_cache)
    COST_UNITS.labels("accepted").inc(cost)
    return _accepted(claim, 202)


def _cached_webhook(svc: Services, req: GenerateRequest, task_id: str, result: dict[str, Any]) -> None:
    """A hit that asked for a webhook gets its ``completed`` delivery, queued as the
    worker queues it (no ``started`` or ``progress``: nothing runs)."""
    url = None if req.callback_url is None else str(req.callback_url)
    enqueue_event(svc.celery, svc.settings, task_id, url, req.callback_events, "completed",
                  webhook_payload(task_id, states.SUCCESS, result))


def _cached_result(svc: Services, digest: str, pixels_fp: str, model: str) -> dict[str, Any] | None:
    """The stored result (marked cached) of an identical earlier request of this key,
    or None when there is none that can answer (not SUCCESS, files gone, expired)."""
    earlier = ResultIndex(svc.redis, svc.settings.result_expires_s).lookup(digest, pixels_fp)
    if earlier is None or svc.owners.owner(earlier) != digest:
        return None
    storage = app_storage()
    exists = storage.exists if isinstance(storage, S3Storage) else lambda key: storage.path(key).is_file()
    return reusable(earlier, svc.celery.backend.get_task_meta(earlier), model, exists)


def _state_reader(svc: Services) -> Callable[[str], str]:
    def state_of(task_id: str) -> str:
        return str(svc.celery.backend.get_task_meta(task_id)["status"])
    return state_of


def _quietly(undo: Callable[..., object], *args: object) -> None:
    """Undo what a submission that queued nothing recorded; with Redis down the
    record expires with the results' lifetime instead."""
    try:
        undo(*args)
    except RedisError:
        pass


def _replay(earlier: Claim, fingerprint: str) -> Response:
    """200 with the first task of this idempotency key, or 409 for another body."""
    if earlier.body_hash != fingerprint:
        raise ApiError(409, f"{IDEMPOTENCY_HEADER} was already used with another request body",
                       field=IDEMPOTENCY_HEADER, task_id=earlier.task_id)
    return _accepted(earlier, 200)


def _accepted(claim: Claim, status: int, cached: bool = False) -> Response:
    # The configured public address, never the request's Host header (a client could set it).
    status_url = services().settings.public_base + url_for("tasks.get_task", task_id=claim.task_id)
    resp = jsonify(SubmitResponse(task_id=claim.task_id, status_url=status_url, seed=claim.seed,
                                  cost=claim.cost, cached=cached).model_dump())
    resp.status_code = status
    resp.headers["Location"] = status_url
    return resp
