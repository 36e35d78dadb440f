"""GET /api/v1/models, and which model (and queue) a submission goes to.

A model's live workers are the workers that answer ``batching`` naming it;
one that an operator has drained (``celery control cancel_consumer``) still
answers, with its model's queue gone from ``consuming``, until it stops.
Whether anyone consumes a model's queue is asked of Celery itself
(``inspect active_queues``), cached like the health check's ping, and only
when that queue has grown to ``max_queue_without_worker``.
"""
from __future__ import annotations

from flask import Blueprint, current_app, jsonify
from kombu.exceptions import OperationalError
from pydantic import BaseModel, Field
from redis.exceptions import RedisError

from imagegenx.api.errors import ApiError
from imagegenx.api.guards import require_key
from imagegenx.api.metrics import queue_keys
from imagegenx.api.services import Services, services
from imagegenx.api.worker_presence import WorkerPresence
from imagegenx.api.workers import WorkerInfo, live_workers
from imagegenx.lora_catalog import LoraCatalog
from imagegenx.models import no_worker_reason, unknown_model_reason
from imagegenx.schemas import Sampler

bp = Blueprint("models", __name__, url_prefix="/api/v1")
# How long one `inspect active_queues` answer is reused, and how long it waits for replies.
CONSUMERS_MAX_AGE_S = 2.0
CONSUMERS_TIMEOUT_S = 1.0


class ModelWorker(BaseModel):
    hostname: str
    model_version: str | None
    consuming: bool = Field(description="takes new requests (false: draining after cancel_consumer)")
    buffered_requests: int
    running_requests: int


class ModelInfo(BaseModel):
    name: str
    default: bool = Field(description="used when a request names no model")
    queue: str
    queue_depth: int = Field(description="requests waiting in the model's queue")
    versions: list[str] = Field(description="model versions its live workers draw with")
    workers: list[ModelWorker]
    native_size: list[int] | None = Field(description="[width, height] of an unset size (null while "
                                                      "no worker has loaded the model)")
    samplers: list[str]
    loras: list[str] = Field(description="LoRA names a request for this model may use")


class ModelsResponse(BaseModel):
    models: list[ModelInfo]
    timeout_s: float = Field(description="how long workers had to answer")


def resolve(svc: Services, name: str | None) -> str:
    """The served model a request names (default: the first); 422 for an unknown one."""
    served = list(svc.settings.served_models)
    if name is None:
        return served[0]
    if name not in served:
        raise ApiError(422, "invalid request", fields=[{"field": "model",
                                                        "reason": unknown_model_reason(name, served)}])
    return name


def depth(svc: Services, queue: str) -> int:
    """Messages waiting in ``queue`` over its priority lists (raises RedisError)."""
    pipe = svc.redis.pipeline(transaction=False)
    for key in queue_keys(queue):
        pipe.llen(key)
    return int(sum(pipe.execute()))


def consumed_queues() -> WorkerPresence:
    """Names of the queues some live worker consumes (cached per app)."""
    ext = current_app.extensions
    if "imagegenx.consumers" not in ext:
        control = services().celery.control

        def active_queues() -> list[str]:
            replies = control.inspect(timeout=CONSUMERS_TIMEOUT_S).active_queues() or {}
            return [q["name"] for queues in replies.values() for q in queues or []]

        ext.setdefault("imagegenx.consumers", WorkerPresence(active_queues, CONSUMERS_MAX_AGE_S))
    presence: WorkerPresence = ext["imagegenx.consumers"]
    return presence


def refuse_without_worker(svc: Services, model: str, queue: str, waiting: int) -> None:
    """503 when ``model``'s queue holds ``max_queue_without_worker`` requests and no
    live worker consumes it: they would wait with no one to run them."""
    limit = svc.settings.max_queue_without_worker
    if waiting < limit or queue in consumed_queues().workers():
        return
    raise ApiError(503, no_worker_reason(model, waiting, limit),
                   headers={"Retry-After": str(svc.settings.retry_after_s)},
                   model=model, queue_depth=waiting)


def describe(svc: Services, workers: list[WorkerInfo]) -> list[ModelInfo]:
    out = []
    default = svc.settings.default_model
    for name, spec in svc.settings.served_models.items():
        queue = svc.settings.queue_for(name)
        mine = [w for w in workers if w.model == name]
        first = next((w for w in mine if w.native_size), None)
        samplers = sorted({s for w in mine for s in w.samplers}) or [s.value for s in Sampler]
        out.append(ModelInfo(
            name=name, default=name == default, queue=queue, queue_depth=depth(svc, queue),
            versions=sorted({w.model_version for w in mine if w.model_version}),
            workers=[ModelWorker(hostname=w.hostname, model_version=w.model_version,
                                 consuming=w.consuming is None or queue in w.consuming,
                                 buffered_requests=w.buffered_requests,
                                 running_requests=w.running_requests) for w in mine],
            native_size=first.native_size if first else None,
            samplers=samplers,
            loras=LoraCatalog(spec.lora_dir or svc.settings.lora_dir).names(),
        ))
    return out


@bp.get("/models")
def list_models():  # type: ignore[no-untyped-def]
    require_key()
    svc = services()
    timeout = svc.settings.workers_inspect_timeout_s
    try:
        models = describe(svc, live_workers(timeout))
    except (RedisError, OperationalError, ConnectionError) as exc:
        raise ApiError(503, f"broker unavailable: {type(exc).__name__}",
                       headers={"Retry-After": str(svc.settings.retry_after_s)}) from exc
    return jsonify(ModelsResponse(models=models, timeout_s=timeout).model_dump(mode="json"))
