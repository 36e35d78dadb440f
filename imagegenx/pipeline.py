"""Turn a batch of validated requests into stored images and per-request results.

Independent of Celery: the worker's executor supplies the jobs and the
callbacks; this module plans the engine batch, maps samples back to requests,
post-processes, stores files and isolates failures (a request that makes its
batch fail is found by bisection, so it alone fails).
"""
from __future__ import annotations

import logging
import os
import secrets
import threading
import time
import uuid
from collections.abc import Callable, Collection
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from PIL import Image

from imagegenx.batching import BatchKey
from imagegenx.engine.base import BatchSpec, Engine, Sample
from imagegenx.errors import GenerationError
from imagegenx.postprocess import render
from imagegenx.schemas import MAX_SEED, BatchInfo, GenerateRequest, GenerateResult, ImageResult
from imagegenx.storage import Storage

log = logging.getLogger(__name__)

# PNG encoding dominates post-processing and releases the GIL, so the images of
# a batch are rendered in parallel: the GPU waits less between batches.
_render_pool: ThreadPoolExecutor | None = None
_render_pool_lock = threading.Lock()


def render_pool() -> ThreadPoolExecutor:
    global _render_pool
    with _render_pool_lock:
        if _render_pool is None:
            _render_pool = ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1),
                                              thread_name_prefix="imagegenx-render")
        return _render_pool


def resolve_request(request: GenerateRequest, native_size: tuple[int, int]) -> GenerateRequest:
    """Fill server-chosen values: a seed, and the model's native size."""
    updates: dict[str, object] = {}
    if request.seed is None:
        updates["seed"] = secrets.randbelow(MAX_SEED + 1 - request.num_images)
    if request.width is None:
        updates["width"] = native_size[0]
    if request.height is None:
        updates["height"] = native_size[1]
    return request.model_copy(update=updates) if updates else request


def batch_key(request: GenerateRequest, model: str) -> BatchKey:
    """Compatibility key of a resolved request."""
    assert request.width is not None and request.height is not None
    return BatchKey(model, request.width, request.height, request.steps, request.sampler.value)


@dataclass
class Job:
    """One request inside a batch (already resolved: seed and size are set)."""

    id: str
    request: GenerateRequest
    received_at: float = field(default_factory=time.time)


# Called with (step, total) at every step boundary; returns ids of jobs to drop.
JobStepCallback = Callable[[int, int], Collection[str]]


@dataclass
class Outcome:
    """Per-job outcome: exactly one of result / error is set, or dropped."""

    result: GenerateResult | None = None
    error: Exception | None = None
    dropped: bool = False


def plan(jobs: list[Job]) -> tuple[BatchSpec, list[tuple[int, int]]]:
    """The engine batch for ``jobs`` and, per sample, (job index, image index)."""
    first = jobs[0].request
    samples: list[Sample] = []
    owners: list[tuple[int, int]] = []
    for j, job in enumerate(jobs):
        r = job.request
        for i, seed in enumerate(r.sample_seeds()):
            samples.append(Sample(r.prompt, seed, r.guidance_scale, r.negative_prompt))
            owners.append((j, i))
    assert first.width is not None and first.height is not None
    spec = BatchSpec(first.width, first.height, first.steps, first.sampler.value, tuple(samples))
    return spec, owners


class BatchPipeline:
    """Runs batches on one engine and stores their outputs."""

    def __init__(self, engine: Engine, storage: Storage, public_url: str, model_name: str) -> None:
        self.engine = engine
        self.storage = storage
        self.public_url = public_url.rstrip("/")
        self.model_name = model_name
        # Most images per engine batch, learnt from out-of-memory errors (None: no limit).
        self.image_limit: int | None = None

    def file_url(self, key: str) -> str:
        """A storage that signs its own URLs (S3) gives them; local files are served by the API."""
        own_url = getattr(self.storage, "url", None)
        if own_url is not None:
            return str(own_url(key))
        return f"{self.public_url}/api/v1/files/{key}"

    def run(self, jobs: list[Job], on_step: JobStepCallback | None = None) -> dict[str, Outcome]:
        """Run ``jobs`` as one batch; on failure bisect so only the culprit fails.

        After an out-of-memory error the pipeline remembers a lower image limit
        and cuts later batches to fit it, so one OOM does not repeat on every batch.
        """
        images = _images(jobs)
        if len(jobs) > 1 and self.image_limit is not None and images > self.image_limit:
            outcomes: dict[str, Outcome] = {}
            for part in _fit(jobs, self.image_limit):
                outcomes.update(self.run(part, on_step))
            return outcomes
        try:
            return self._run_once(jobs, on_step)
        except Exception as exc:  # noqa: BLE001 - isolate, then report per job
            oom = is_out_of_memory(exc)
            if oom:
                self._lower_limit(images)
            if len(jobs) == 1:
                log.exception("request %s failed", jobs[0].id)
                error = (GenerationError(f"out of memory with {images} images in one batch "
                                         f"({type(exc).__name__}: {exc})")
                         if oom else _as_generation_error(exc))
                return {jobs[0].id: Outcome(error=error)}
            log.warning("batch of %d failed (%r); retrying in halves", len(jobs), exc)
            # The traceback's frames hold the failed batch's tensors: drop them
            # before the retry, or an out-of-memory error repeats at every split.
            exc.__traceback__ = None
        self._release_memory()
        mid = len(jobs) // 2
        outcomes = self.run(jobs[:mid], on_step)
        outcomes.update(self.run(jobs[mid:], on_step))
        return outcomes

    def _release_memory(self) -> None:
        """Give the engine a chance to free what a failed batch left (GPU cache)."""
        release = getattr(self.engine, "release_memory", None)
        if release is not None:
            release()

    def _lower_limit(self, images: int) -> None:
        if self.image_limit is not None and images > self.image_limit:
            return  # one request larger than the limit, run alone: the limit still holds
        limit = max(1, images // 2)
        if self.image_limit is None or limit < self.image_limit:
            self.image_limit = limit
            log.warning("out of memory with %d images: batches are cut to at most %d images "
                        "from now on", images, limit)

    def _run_once(self, jobs: list[Job], on_step: JobStepCallback | None) -> dict[str, Outcome]:
        spec, owners = plan(jobs)
        batch_id = uuid.uuid4().hex
        dropped_jobs: set[str] = set()

        def step_cb(step: int, total: int) -> list[int]:
            if on_step is None:
                return []
            newly = set(on_step(step, total)) - dropped_jobs
            dropped_jobs.update(newly)
            if not newly:
                return []
            return [s for s, (j, _) in enumerate(owners) if jobs[j].id in newly]

        started = time.time()
        t0 = time.perf_counter()
        images = self.engine.generate(spec, step_cb)
        t_engine = time.perf_counter() - t0
        if len(images) != len(owners):
            raise GenerationError(f"engine returned {len(images)} images for {len(owners)} samples")

        per_job: list[list[Image.Image | None]] = [[] for _ in jobs]
        for (j, _), image in zip(owners, images):
            per_job[j].append(image)

        outcomes: dict[str, Outcome] = {}
        info = BatchInfo(id=batch_id, size=len(owners), requests=len(jobs))
        pool = render_pool()
        rendered = {
            job.id: [pool.submit(render, im, job.request.postprocess) for im in imgs]
            for job, imgs in zip(jobs, per_job)
            if job.id not in dropped_jobs and all(im is not None for im in imgs)
        }
        for job, imgs in zip(jobs, per_job):
            if job.id not in rendered:
                outcomes[job.id] = Outcome(dropped=True)
                continue
            t1 = time.perf_counter()
            results = self._store(job, imgs, rendered[job.id])  # type: ignore[arg-type]
            timings = {
                "queued_s": max(0.0, started - job.received_at),
                "engine_s": t_engine,
                "postprocess_s": time.perf_counter() - t1,
            }
            outcomes[job.id] = Outcome(
                result=GenerateResult(
                    images=results,
                    batch=info,
                    timings=timings,
                    model=self.model_name,
                    sampler=job.request.sampler,
                    steps=job.request.steps,
                )
            )
        return outcomes

    def _store(self, job: Job, images: list[Image.Image],
               rendered: list[Future[tuple[bytes, bytes]]] | None = None) -> list[ImageResult]:
        r = job.request
        out = []
        for i, (image, seed) in enumerate(zip(images, r.sample_seeds())):
            full, thumb = rendered[i].result() if rendered else render(image, r.postprocess)
            key = f"{job.id}/{i}.png"
            thumb_key = f"{job.id}/{i}.thumb.png"
            self.storage.put(key, full, "image/png")
            self.storage.put(thumb_key, thumb, "image/png")
            out.append(
                ImageResult(
                    url=self.file_url(key),
                    thumbnail_url=self.file_url(thumb_key),
                    seed=seed,
                    width=image.width,
                    height=image.height,
                )
            )
        return out


def is_out_of_memory(exc: BaseException) -> bool:
    """An out-of-memory error: MemoryError, or torch's ``OutOfMemoryError`` (matched by
    name, so this module needs no torch)."""
    return isinstance(exc, MemoryError) or any(
        cls.__name__ == "OutOfMemoryError" for cls in type(exc).__mro__
    )


def _images(jobs: list[Job]) -> int:
    return sum(job.request.num_images for job in jobs)


def _fit(jobs: list[Job], limit: int) -> list[list[Job]]:
    """Consecutive parts of at most ``limit`` images (a larger request alone)."""
    parts: list[list[Job]] = []
    size = 0
    for job in jobs:
        n = job.request.num_images
        if parts and size + n <= limit:
            parts[-1].append(job)
            size += n
        else:
            parts.append([job])
            size = n
    return parts


def _as_generation_error(exc: Exception) -> GenerationError:
    if isinstance(exc, GenerationError):
        return exc
    return GenerationError(f"{type(exc).__name__}: {exc}")
