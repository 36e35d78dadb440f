"""Peer 1, plain Celery: one task per message, no batching at all.

The way a diffusion model is commonly put behind Celery: a normal task whose
body draws one image. One prefork child (concurrency 1, one model per worker),
prefetch 1 and late acks, so a worker holds one message at a time and a lost
worker's message is redelivered. Every image pays the full fixed cost of a
denoise step: with the sd15-h200 cost model, 20 x (13 + 3.3) + 13 = 339 ms,
which caps one worker at about 2.95 images/s.

Start: ``celery -A bench.peers.plain_app worker`` (settings below and PEER_*).
"""
from __future__ import annotations

from typing import Any

from celery import Celery

from bench.peers._common import QUEUE, base_config, run_batch

TASK_NAME = "bench.plain.generate"

app = Celery("bench_plain", set_as_current=False)
app.conf.update(base_config())
app.conf.update(
    {
        "task_routes": {TASK_NAME: {"queue": QUEUE}},
        "worker_pool": "prefork",
        "worker_concurrency": 1,
        "worker_prefetch_multiplier": 1,
    }
)


@app.task(name=TASK_NAME, acks_late=True)
def generate(**request: Any) -> dict[str, Any]:
    """Draw the request's image as a batch of one."""
    return run_batch([request])[0]
