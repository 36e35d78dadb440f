"""Peer 2, celery-batches: Celery's own answer to "process messages as a list".

A ``celery_batches.Batches`` task buffers received messages and flushes them
to the pool as one call when ``flush_every`` (= the benchmark's max batch N)
messages have arrived or every ``flush_interval`` (50 ms, our max wait),
whichever comes first. The batch is therefore fixed when it is *flushed*, not
when the model becomes free: while a batch runs, later flushes queue up in the
pool as further (often small) batches.

One model thread (threads pool, concurrency 1, as our worker), late acks, and
a prefetch window of 2 x N messages (celery-batches needs the window to exceed
flush_every; 2 x N is also what our worker holds). Each request's result is
stored with ``app.backend.mark_as_done(request.id, result, request=request)``,
as celery-batches documents.

celery-batches 0.11 requires Celery < 5.7, so this app runs from its own
virtualenv (created by ``bench.batching_peers``) with the repository on
PYTHONPATH. Start: ``celery -A bench.peers.batches_app worker``.
"""
from __future__ import annotations

from typing import Any

from celery import Celery
from celery_batches import Batches, SimpleRequest

from bench.peers._common import FLUSH_INTERVAL_S, MAX_BATCH, QUEUE, base_config, run_batch

TASK_NAME = "bench.batches.generate"

app = Celery("bench_batches", set_as_current=False)
app.conf.update(base_config())
app.conf.update(
    {
        "task_routes": {TASK_NAME: {"queue": QUEUE}},
        "worker_pool": "threads",
        "worker_concurrency": 1,
        "worker_prefetch_multiplier": 2 * MAX_BATCH,
    }
)


@app.task(name=TASK_NAME, base=Batches, flush_every=MAX_BATCH, flush_interval=FLUSH_INTERVAL_S,
          acks_late=True)
def generate(requests: list[SimpleRequest]) -> None:
    """Draw every buffered request's image in one engine batch."""
    results = run_batch([dict(r.kwargs) for r in requests])
    for request, result in zip(requests, results):
        app.backend.mark_as_done(request.id, result, request=request)
