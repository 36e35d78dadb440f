"""Settings and engine shared by the peer apps.

The peers read their broker, queue and batch size from the environment so
that the benchmark can give each run its own Redis database and queue.
"""
from __future__ import annotations

import os
import uuid
from typing import Any

from imagegenx.engine.base import BatchSpec, Sample
from imagegenx.engine.synthetic import SyntheticEngine

REDIS_URL = os.environ.get("PEER_REDIS_URL", "redis://127.0.0.1:6379/12")
QUEUE = os.environ.get("PEER_QUEUE", "bench-peer")
MAX_BATCH = int(os.environ.get("PEER_MAX_BATCH", "16"))
FLUSH_INTERVAL_S = float(os.environ.get("PEER_FLUSH_INTERVAL_S", "0.05"))
COST_MODEL = os.environ.get("PEER_COST_MODEL", "sd15-h200")
NATIVE_SIZE = 64  # the synthetic engine's native size, as our worker resolves it

ENGINE = SyntheticEngine(COST_MODEL)


def base_config() -> dict[str, Any]:
    """What every peer shares with our worker's app: JSON only, late acks."""
    return {
        "broker_url": REDIS_URL,
        "result_backend": REDIS_URL,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "task_default_queue": QUEUE,
        "broker_connection_retry_on_startup": True,
        "worker_hijack_root_logger": False,
    }


def sample_of(request: dict[str, Any]) -> Sample:
    return Sample(
        prompt=str(request.get("prompt", "")),
        seed=int(request.get("seed") or 0),
        guidance_scale=float(request.get("guidance_scale", 7.5)),
        negative_prompt=str(request.get("negative_prompt", "")),
    )


def run_batch(requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Draw one image per request as ONE engine batch; a result dict per request.

    Every request of a benchmark shares steps, size and sampler, so a single
    BatchSpec covers the batch (the first request's settings are used).
    """
    first = requests[0]
    spec = BatchSpec(
        width=int(first.get("width") or NATIVE_SIZE),
        height=int(first.get("height") or NATIVE_SIZE),
        steps=int(first.get("steps", 20)),
        sampler=str(first.get("sampler", "euler")),
        samples=tuple(sample_of(r) for r in requests),
    )
    images = ENGINE.generate(spec)
    batch = {"id": uuid.uuid4().hex, "size": len(requests), "requests": len(requests)}
    return [
        {"seed": s.seed, "width": im.width if im else None, "height": im.height if im else None,
         "batch": batch}
        for s, im in zip(spec.samples, images)
    ]
