"""GET /api/v1/workers: the live workers, their GPUs, queues and batch statistics.

Asks every worker with the ``batching`` inspect command (``celery -A tasks
inspect batching``) and waits ``workers_inspect_timeout_s`` for the replies; a
worker that does not answer within it is absent from the list.
"""
from __future__ import annotations

import logging
from typing import Any

from flask import Blueprint, jsonify
from kombu.exceptions import OperationalError
from pydantic import BaseModel, ConfigDict, Field
from redis.exceptions import RedisError

from imagegenx.api.errors import ApiError
from imagegenx.api.guards import require_key
from imagegenx.api.services import services

log = logging.getLogger(__name__)
bp = Blueprint("workers", __name__, url_prefix="/api/v1")


class GpuInfo(BaseModel):
    index: int = Field(description="the GPU's index as nvidia-smi lists it (-1 for a MIG instance)")
    uuid: str
    name: str
    utilization: float | None = Field(description="share of the last sample period the GPU was "
                                                  "busy, 0 to 1 (null where NVML cannot tell)")
    memory_used_bytes: int
    memory_total_bytes: int


class BatchingStats(BaseModel):
    """Batching limits and statistics since the worker started."""

    model_config = ConfigDict(extra="allow")

    max_batch: int
    max_wait_ms: float
    batches: int = 0
    images: int = 0
    requests: int = 0
    succeeded: int = 0
    failed: int = 0
    revoked: int = 0
    mean_batch_images: float = 0.0
    batch_size_histogram: dict[str, int] = Field(default_factory=dict,
                                                 description="batches by size in images")
    last_batch_s: float = 0.0
    mean_buffer_wait_ms: float = 0.0
    max_buffer_wait_ms: float = 0.0
    warmup_s: float = 0.0


class WorkerInfo(BaseModel):
    hostname: str
    device: str = Field(description='"cuda" or "cpu": where the worker\'s engine runs')
    gpus: list[GpuInfo] = Field(description="NVML readings of the worker's GPUs; empty on the CPU "
                                            "or where NVML is not installed")
    engine: str | None
    model: str
    model_version: str | None = Field(None, description="version of the model's weights it draws with")
    native_size: list[int] | None = Field(None, description="[width, height] drawn when a request "
                                                            "leaves them unset")
    samplers: list[str] = Field(default_factory=list)
    consuming: list[str] | None = Field(None, description="queues it takes requests from now; "
                                                          "empty after cancel_consumer (draining)")
    buffered_requests: int = Field(description="received, waiting for a batch")
    running_requests: int = Field(description="in the batch that is running")
    finishing_requests: int = Field(0, description="drawn, being stored and reported")
    metrics_port: int | None = Field(description="port of the worker's Prometheus metrics, if served")
    batching: BatchingStats


class WorkersResponse(BaseModel):
    workers: list[WorkerInfo]
    timeout_s: float = Field(description="how long workers had to answer")


_LIVE = ("engine", "model", "model_version", "native_size", "samplers", "consuming", "device",
         "gpus", "metrics_port", "buffered_requests", "running_requests", "finishing_requests")


def worker_info(hostname: str, reply: dict[str, Any]) -> WorkerInfo:
    """A worker's ``batching`` reply as a WorkerInfo."""
    return WorkerInfo(
        hostname=hostname,
        device=reply.get("device") or "cpu",
        gpus=reply.get("gpus") or [],
        engine=reply.get("engine"),
        model=reply.get("model") or "",
        model_version=reply.get("model_version"),
        native_size=reply.get("native_size"),
        samplers=reply.get("samplers") or [],
        consuming=reply.get("consuming"),
        buffered_requests=reply.get("buffered_requests", 0),
        running_requests=reply.get("running_requests", 0),
        finishing_requests=reply.get("finishing_requests", 0),
        metrics_port=reply.get("metrics_port"),
        batching=BatchingStats.model_validate({k: v for k, v in reply.items() if k not in _LIVE}),
    )


def live_workers(timeout: float) -> list[WorkerInfo]:
    """Every worker that answers ``batching`` within ``timeout`` seconds."""
    replies = services().celery.control.broadcast("batching", reply=True, timeout=timeout) or []
    out = []
    for reply in replies:
        for hostname, body in reply.items():
            if not isinstance(body, dict) or "max_batch" not in body:
                log.warning("worker %s answered batching with %r", hostname, body)
                continue
            out.append(worker_info(hostname, body))
    return sorted(out, key=lambda w: w.hostname)


@bp.get("/workers")
def list_workers():  # type: ignore[no-untyped-def]
    require_key()
    timeout = services().settings.workers_inspect_timeout_s
    try:
        workers = live_workers(timeout)
    except (RedisError, OperationalError, ConnectionError) as exc:
        raise ApiError(503, f"broker unavailable: {type(exc).__name__}",
                       headers={"Retry-After": "5"}) from exc
    return jsonify(WorkersResponse(workers=workers, timeout_s=timeout).model_dump(mode="json"))
