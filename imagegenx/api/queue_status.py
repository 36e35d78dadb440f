"""GET /api/v1/queue: the signals an autoscaler needs. Depth and oldest age of
each served model's generation queue and of the webhook queue, live workers and their capacity, and an
estimated drain time (imagegenx.scaling says how it is estimated).

Workers are asked as ``GET /api/v1/workers`` asks them (``batching``, waiting
``workers_inspect_timeout_s``).
"""
from __future__ import annotations

import time

from flask import Blueprint, jsonify
from kombu.exceptions import OperationalError
from pydantic import BaseModel, Field
from redis.exceptions import RedisError

from imagegenx import scaling
from imagegenx.api.errors import ApiError
from imagegenx.api.guards import require_key
from imagegenx.api.metrics import queue_keys
from imagegenx.api.services import Services, services
from imagegenx.api.workers import live_workers

bp = Blueprint("queue", __name__, url_prefix="/api/v1")
# Oldest messages read per list to estimate the work of a waiting request.
SAMPLE = 100


class QueueInfo(BaseModel):
    name: str
    model: str | None = Field(None, description="the served model whose requests it holds "
                                                "(null: the webhook queue)")
    depth: int = Field(description="messages waiting in Redis (not yet taken by a worker)")
    oldest_age_s: float | None = Field(description="seconds since the oldest waiting message was "
                                                   "sent (null when the queue is empty)")


class WorkerCapacity(BaseModel):
    hostname: str
    scheduler: str | None
    max_batch: int = Field(description="most image rows in one UNet call (or one batch)")
    buffered_requests: int
    running_requests: int
    image_steps_per_s: float | None = Field(description="measured since the worker started "
                                                        "(null before its first UNet call)")


class DrainEstimate(BaseModel):
    waiting_requests: int = Field(description="queued in Redis plus buffered in workers")
    mean_image_steps: float | None = Field(description="steps x num_images, mean over the oldest "
                                                       f"{SAMPLE} waiting messages")
    image_steps_per_s: float = Field(description="sum of the live workers' measured throughput")
    estimate_s: float | None = Field(description="waiting_requests x mean_image_steps / "
                                                 "image_steps_per_s; null when it cannot be told "
                                                 "(no worker has measured its throughput yet)")


class QueueResponse(BaseModel):
    queues: list[QueueInfo]
    workers: list[WorkerCapacity]
    capacity_rows: int = Field(description="sum of the live workers' max_batch")
    drain: DrainEstimate
    timeout_s: float = Field(description="how long workers had to answer")


def _queue(svc: Services, name: str, now: float,
           model: str | None = None) -> tuple[QueueInfo, list[bytes]]:
    """A queue's depth and age over its priority lists, and its oldest messages."""
    keys = queue_keys(name)
    pipe = svc.redis.pipeline(transaction=False)
    for key in keys:
        pipe.llen(key)
        pipe.lrange(key, -SAMPLE, -1)  # kombu LPUSHes and BRPOPs: the oldest are at the tail
    replies = pipe.execute()
    depth = sum(replies[0::2])
    oldest = [lst[-1] for lst in replies[1::2] if lst]
    sample = [raw for lst in replies[1::2] for raw in lst]
    return QueueInfo(name=name, model=model, depth=depth,
                     oldest_age_s=scaling.oldest_age_s(oldest, now)), sample


def snapshot(svc: Services) -> QueueResponse:
    """The queue and the workers now (raises RedisError, OperationalError)."""
    now = time.time()
    gens, sample = [], []
    for model, queue in svc.settings.generation_queues.items():
        info, oldest = _queue(svc, queue, now, model)
        gens.append(info)
        sample += oldest
    hooks, _ = _queue(svc, svc.settings.webhook_queue_name, now)
    timeout = svc.settings.workers_inspect_timeout_s
    workers = [WorkerCapacity(
        hostname=w.hostname, scheduler=(w.batching.model_extra or {}).get("scheduler"),
        max_batch=w.batching.max_batch, buffered_requests=w.buffered_requests,
        running_requests=w.running_requests,
        image_steps_per_s=scaling.throughput(w.batching.model_dump()),
    ) for w in live_workers(timeout)]
    steps = [s for s in map(scaling.image_steps, sample) if s is not None]
    mean = sum(steps) / len(steps) if steps else None
    rate = sum(w.image_steps_per_s or 0.0 for w in workers)
    waiting = sum(g.depth for g in gens) + sum(w.buffered_requests for w in workers)
    drain = DrainEstimate(waiting_requests=waiting, mean_image_steps=mean,
                          image_steps_per_s=round(rate, 3),
                          estimate_s=scaling.drain_s(waiting, mean, rate))
    return QueueResponse(queues=[*gens, hooks], workers=workers,
                         capacity_rows=sum(w.max_batch for w in workers), drain=drain,
                         timeout_s=timeout)


@bp.get("/queue")
def queue_status():  # type: ignore[no-untyped-def]
    require_key()
    svc = services()
    try:
        body = snapshot(svc)
    except (RedisError, OperationalError, ConnectionError) as exc:
        raise ApiError(503, f"broker unavailable: {type(exc).__name__}",
                       headers={"Retry-After": str(svc.settings.retry_after_s)}) from exc
    return jsonify(body.model_dump(mode="json"))
