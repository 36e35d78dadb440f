"""The worker's vocabulary for a request, and its one record of one.

- **request state** (:class:`RequestState`): one request in the worker, from
  delivery to ack. The consumer creates it, the schedulers queue it, the model
  thread runs it, the finishing thread stores, reports and acknowledges it.
  The validated request, the Celery request it came in (``delivery``, opaque
  here, so this module and the pure schedulers and pipeline need no Celery),
  and every per-request record of the worker live on it.
- **row**: one image of a request in a UNet call (an *image row*); the UNet
  runs it as two *UNet rows* while classifier-free guidance is on, one
  otherwise (``imagegenx.guidance``). The engine's input for a row keeps the
  engine contract's own name, ``imagegenx.engine.base.Sample``: renaming it
  would only churn the engines, benchmarks and tests that build batches.
- **step output** (``imagegenx.pipeline.StepOutput``): what the engine phase
  hands to the finishing phase; in it, per request, an ``Outcome``: its drawn
  images, or already its end (a result, an error, or dropped).

The schedulers (``imagegenx.batching``, ``imagegenx.step_scheduler``) are
generic over what they queue, so their pure tests queue plain values; the
worker queues request states. Their own bookkeeping of a queued item (arrival
time, rows) is private to them and never handed out.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from imagegenx.schemas import GenerateRequest


@dataclass(eq=False)  # one record per delivery: compared by identity
class RequestState:
    """One request in the worker, from delivery to ack (see the module docstring)."""

    id: str  # the task id
    request: GenerateRequest  # resolved: seed and size are set
    # The Celery request (``celery.worker.request.Request``) it was delivered as:
    # states, events and the ack go through it. None outside a worker.
    delivery: Any = None
    received_at: float = field(default_factory=time.time)
    # Delivered before (another worker, or this one before a reconnect, may
    # have finished it): the result backend is checked again before it runs.
    redelivered: bool = False
    # It ran before on a worker that was lost (it may be what kills workers): it
    # runs alone, and only once every request before it is stored and acknowledged.
    suspect: bool = False
    # Last time this worker recorded the message as delivered now (workers.leases).
    leased_at: float = 0.0
    # Step scheduler: the engine's state of its trajectory (None until admitted),
    # when it was admitted (perf_counter and wall clock), the most rows and
    # requests it shared a UNet call with, and when its progress was last stored.
    denoising: Any = None
    run_id: str = ""
    admitted_at: float = 0.0
    started_at: float = 0.0
    peak_rows: int = 0
    peak_requests: int = 0
    progress_at: float = float("-inf")
    # Its steps are done and its decode is queued (the step loop holds the pending
    # decode): it stays in the running set, at no rows, until its images are collected.
    decoding: bool = False
    # Previews: the step of the last one taken, the latest one encoded (the progress
    # data's "preview"), and the step of the last progress stored.
    preview_step: int = 0
    preview: dict[str, Any] | None = None
    progress_step: int = 0

    @property
    def images(self) -> int:
        """Images (rows) the request draws."""
        return self.request.num_images
