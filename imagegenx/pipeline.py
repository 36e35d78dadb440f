"""Turn a batch of validated requests into stored images and per-request results.

Independent of Celery: the worker's executor supplies the request states and the
callbacks; this module plans the engine batch, maps samples back to requests,
post-processes, stores files and isolates failures (a request that makes its
batch fail is found by bisection, so it alone fails).

A batch runs in two phases so that the GPU need not wait for the CPU work:
``draw`` (engine only; the thread that owns the model) and ``finish``
(rendering, storing, results; any thread). ``run`` does both.
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
from typing import Any

from PIL import Image

from imagegenx.batching import BatchKey
from imagegenx.cost import request_cost
from imagegenx.engine.base import BatchSpec, Engine, Sample
from imagegenx.errors import (
    BatchSetupError,
    DeviceLost,
    GenerationError,
    device_lost,
    is_device_error,
    is_out_of_memory,
)
from imagegenx.postprocess import render
from imagegenx.request_state import RequestState
from imagegenx.schemas import MAX_SEED, BatchInfo, GenerateRequest, GenerateResult, ImageResult
from imagegenx.settings import PngCompression
from imagegenx.storage import Storage
from imagegenx.upscale import LanczosUpscaler, Upscaler

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
    return BatchKey(model, request.width, request.height, request.steps, request.sampler.value,
                    request.lora_set())


def step_group(request: GenerateRequest, model: str) -> tuple[str, int, int, tuple[tuple[str, float], ...]]:
    """What requests must share to run in one UNet call under the step scheduler:
    model, size and LoRA set (steps, sampler, guidance, seed and prompt are per row)."""
    assert request.width is not None and request.height is not None
    return (model, request.width, request.height, request.lora_set())


# Called with (step, total) at every step boundary; returns ids of requests to drop.
RequestStepCallback = Callable[[int, int], Collection[str]]


@dataclass
class Outcome:
    """One request's part of a step output.

    Drawn: ``images`` holds its pictures, not yet rendered or stored, from the
    engine run that began at ``started`` (wall clock) and took ``engine_s``;
    ``finish`` stores them and gives the request its end. Ended: exactly one of
    ``result`` / ``error`` is set, or ``dropped``.
    """

    images: list[Image.Image] | None = None
    batch: BatchInfo | None = None  # the engine run (batch or step-scheduler run) that drew them
    started: float = 0.0
    engine_s: float = 0.0
    upscaled: bool = False  # already enlarged on the engine's device (postprocess.upscale)
    result: GenerateResult | None = None
    error: Exception | None = None
    dropped: bool = False

    @property
    def drawn(self) -> bool:
        return self.images is not None


@dataclass
class StepOutput:
    """What the engine phase hands to the finishing phase: its requests, in the
    order given, and per request its :class:`Outcome` (drawn images, or already
    its end). The engine phase is a whole batch under the request scheduler, and
    the requests that finished (or failed) at one step under the step scheduler.
    """

    requests: list[RequestState]
    outcomes: dict[str, Outcome] = field(default_factory=dict)
    # Set at the hand-over (workers.executor): perf_counter when the engine phase
    # began, and whether it counts as one batch in the statistics (the step
    # scheduler counts its runs itself).
    t0: float = 0.0
    record: bool = True

    @classmethod
    def failed(cls, requests: list[RequestState], error: Exception) -> "StepOutput":
        """Every request failed with ``error`` (the engine phase itself broke)."""
        return cls(requests, {state.id: Outcome(error=error) for state in requests})

    def merge(self, other: "StepOutput") -> None:
        self.outcomes.update(other.outcomes)

    def drawn_requests(self) -> list[tuple[RequestState, Outcome]]:
        """The requests with drawn images, and their outcomes, in order."""
        pairs = [(state, self.outcomes.get(state.id)) for state in self.requests]
        return [(state, o) for state, o in pairs if o is not None and o.drawn]

    def engine_runs(self) -> dict[str, float]:
        """Engine seconds per engine run that produced images (a bisected batch has several)."""
        return {o.batch.id: o.engine_s for _, o in self.drawn_requests() if o.batch is not None}


def plan(states: list[RequestState]) -> tuple[BatchSpec, list[tuple[int, int]]]:
    """The engine batch for ``states`` and, per sample, (request index, image index)."""
    first = states[0].request
    samples: list[Sample] = []
    owners: list[tuple[int, int]] = []
    for j, state in enumerate(states):
        r = state.request
        for i, seed in enumerate(r.sample_seeds()):
            samples.append(Sample(r.prompt, seed, r.guidance_scale, r.negative_prompt,
                                  r.resolved_interval()))
            owners.append((j, i))
    assert first.width is not None and first.height is not None
    spec = BatchSpec(first.width, first.height, first.steps, first.sampler.value, tuple(samples),
                     loras=first.lora_set())
    return spec, owners


def lost_device(engine: Any, exc: BaseException) -> DeviceLost | None:
    """``exc`` as :class:`DeviceLost` when it is a device error (``is_device_error``)
    after which ``engine``'s device no longer works: its ``device_usable`` probe
    fails (an engine without a probe is taken at its word). None otherwise: the
    error is a request's own, handled as any other."""
    if isinstance(exc, DeviceLost):  # found lost further in: no second probe
        return exc
    if not is_device_error(exc):
        return None
    probe = getattr(engine, "device_usable", None)
    try:
        usable = probe is not None and bool(probe())
    except Exception:  # noqa: BLE001 - a probe that fails is the answer
        usable = False
    if usable:
        log.warning("a device error left the device usable (%r): the request's own failure", exc)
        return None
    return device_lost(exc)


class BatchPipeline:
    """Runs batches on one engine and stores their outputs."""

    def __init__(self, engine: Engine, storage: Storage, public_url: str, model_name: str,
                 model_version: str | None = None, upscaler: Upscaler | None = None,
                 prompt_warnings: Callable[[str], list[str]] | None = None,
                 png_compression: PngCompression = "fast") -> None:
        self.engine = engine
        self.png_compression = png_compression
        # What the model cannot draw of a prompt (the result's warnings); None: no check.
        self.prompt_warnings = prompt_warnings
        # postprocess.upscale: a model on the engine's device runs right after the
        # engine (model thread), Lanczos with the rendering (finisher thread).
        self.upscaler: Upscaler = upscaler or LanczosUpscaler(render_pool())
        self.storage = storage
        self.public_url = public_url.rstrip("/")
        self.model_name = model_name
        self.model_version = model_version
        # Most images per engine batch, learnt from out-of-memory errors (None: no limit).
        self.image_limit: int | None = None

    def file_url(self, key: str) -> str:
        """A storage that signs its own URLs (S3) gives them; local files are served by the API."""
        own_url = getattr(self.storage, "url", None)
        if own_url is not None:
            return str(own_url(key))
        return f"{self.public_url}/api/v1/files/{key}"

    def run(self, states: list[RequestState], on_step: RequestStepCallback | None = None) -> dict[str, Outcome]:
        """Draw and finish ``states`` in the calling thread."""
        return self.finish(self.draw(states, on_step))

    def draw(self, states: list[RequestState], on_step: RequestStepCallback | None = None) -> StepOutput:
        """Run ``states`` through the engine as one batch; on failure bisect so
        only the culprit fails. A lost device raises ``DeviceLost`` instead.

        After an out-of-memory error the pipeline remembers a lower image limit
        and cuts later batches to fit it, so one OOM does not repeat on every batch.
        """
        images = _images(states)
        if len(states) > 1 and self.image_limit is not None and images > self.image_limit:
            output = StepOutput(states)
            for part in _fit(states, self.image_limit):
                output.merge(self.draw(part, on_step))
            return output
        try:
            return self._draw_once(states, on_step)
        except BatchSetupError as exc:  # shared by every request: no bisection, no image limit
            log.error("batch of %d failed in its setup: %s", len(states), exc)
            exc.__traceback__ = None
            return StepOutput.failed(states, exc)
        except Exception as exc:  # noqa: BLE001 - isolate, then report per request
            exc.__traceback__ = None
            lost = lost_device(self.engine, exc)
            if lost is not None:  # no request is to blame, and no retry here can work
                raise lost from None
            oom = is_out_of_memory(exc)
            if oom:
                self._lower_limit(images)
            if len(states) == 1:
                log.exception("request %s failed", states[0].id)
                error = (GenerationError(f"out of memory with {images} images in one batch "
                                         f"({type(exc).__name__}: {exc})")
                         if oom else as_generation_error(exc))
                return StepOutput.failed(states, error)
            log.warning("batch of %d failed (%r); retrying in halves", len(states), exc)
            # The traceback's frames hold the failed batch's tensors: drop them
            # before the retry, or an out-of-memory error repeats at every split.
            exc.__traceback__ = None
        self.release_memory()
        mid = len(states) // 2
        output = StepOutput(states)
        output.merge(self.draw(states[:mid], on_step))
        output.merge(self.draw(states[mid:], on_step))
        return output

    def release_memory(self) -> None:
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

    def _draw_once(self, states: list[RequestState], on_step: RequestStepCallback | None) -> StepOutput:
        spec, owners = plan(states)
        batch_id = uuid.uuid4().hex
        dropped: set[str] = set()

        def step_cb(step: int, total: int) -> list[int]:
            if on_step is None:
                return []
            newly = set(on_step(step, total)) - dropped
            dropped.update(newly)
            if not newly:
                return []
            return [s for s, (j, _) in enumerate(owners) if states[j].id in newly]

        started = time.time()
        t0 = time.perf_counter()
        images = self.engine.generate(spec, step_cb)
        t_engine = time.perf_counter() - t0
        if len(images) != len(owners):
            raise GenerationError(f"engine returned {len(images)} images for {len(owners)} samples")

        per_state: list[list[Image.Image | None]] = [[] for _ in states]
        for (j, _), image in zip(owners, images):
            per_state[j].append(image)

        output = StepOutput(states)
        info = BatchInfo(id=batch_id, size=len(owners), requests=len(states))
        for state, imgs in zip(states, per_state):
            if state.id in dropped or any(im is None for im in imgs):
                output.outcomes[state.id] = Outcome(dropped=True)
            else:
                output.outcomes[state.id] = Outcome([im for im in imgs if im is not None],
                                                    info, started, t_engine)
        if self.upscaler.runs_on_device:
            self.upscale_on_device(output)
        return output

    def upscale_on_device(self, output: StepOutput) -> None:
        """Enlarge every image of the step output that asks for it, in one upscaler call."""
        wanted = [(state, o) for state, o in output.drawn_requests()
                  if state.request.postprocess.upscale != 1]
        if wanted:
            self._upscale_drawn(output, wanted)

    def _upscale_drawn(self, output: StepOutput, wanted: list[tuple[RequestState, Outcome]]) -> None:
        """Enlarge ``wanted`` in one call; after running out of memory, once per request.

        A failure fails the requests that asked for upscaling; the engine does not
        run again for them (their pictures exist, only the enlargement broke).
        """
        images = [im for _, o in wanted for im in o.images or []]
        factors = [state.request.postprocess.upscale for state, o in wanted for _ in o.images or []]
        try:
            enlarged = self.upscaler.upscale(images, factors)
        except Exception as exc:  # noqa: BLE001 - those requests fail, the others go on
            exc.__traceback__ = None  # its frames hold the batch's tensors
            lost = lost_device(self.engine, exc)
            if lost is not None:
                raise lost from None
            oom = is_out_of_memory(exc)
            self.release_memory()
            if oom and len(wanted) > 1:
                log.warning("upscaling %d images ran out of memory: once per request", len(images))
                for pair in wanted:
                    self._upscale_drawn(output, [pair])
                return
            log.error("upscaling %d images failed: %r", len(images), exc)
            error = GenerationError(f"upscaling failed{' (out of memory)' if oom else ''}: "
                                    f"{type(exc).__name__}: {exc}")
            for state, _ in wanted:
                output.outcomes[state.id] = Outcome(error=error)
            return
        start = 0
        for _, o in wanted:
            n = len(o.images or [])
            o.images, o.upscaled = enlarged[start:start + n], True
            start += n

    def finish(self, output: StepOutput) -> dict[str, Outcome]:
        """Render and store the drawn images and give each request its end.

        A request whose images cannot be rendered or stored fails alone; the engine
        never runs again for it.
        """
        pool = render_pool()
        prepared: dict[str, tuple[list[Image.Image], list[Future[tuple[bytes, bytes]]], float]] = {}
        failed: dict[str, Outcome] = {}
        for state, o in output.drawn_requests():  # every render starts before the first store
            t0 = time.perf_counter()
            pictures = o.images or []
            try:
                images = pictures if o.upscaled else self._prepare_images(state, pictures)
                futures = [pool.submit(render, im, state.request.postprocess, self.png_compression)
                           for im in images]
            except Exception as exc:  # noqa: BLE001 - this request fails, the others go on
                failed[state.id] = _finish_failed(state, exc)
                continue
            prepared[state.id] = (images, futures, time.perf_counter() - t0)
        outcomes: dict[str, Outcome] = {}
        for state in output.requests:
            o = output.outcomes.get(state.id)
            if state.id in prepared and o is not None:
                images, futures, prepare_s = prepared[state.id]
                outcomes[state.id] = self._finish_one(state, o, images, futures, prepare_s)
            elif o is not None and not o.drawn:  # ended in the engine phase
                outcomes[state.id] = o
            else:
                outcomes[state.id] = failed.get(state.id) or Outcome(error=GenerationError("no images drawn"))
        return outcomes

    def _prepare_images(self, state: RequestState, images: list[Image.Image]) -> list[Image.Image]:
        """Images as they are rendered and stored: enlarged with the CPU upscaler
        when the request asks for it. Runs in ``finish``'s thread."""
        factor = state.request.postprocess.upscale
        if factor == 1:
            return images
        return self.upscaler.upscale(images, [factor] * len(images))

    def _finish_one(self, state: RequestState, drawn: Outcome, images: list[Image.Image],
                    rendered: list[Future[tuple[bytes, bytes]]], prepare_s: float) -> Outcome:
        t1 = time.perf_counter()
        try:
            results = self._store(state, images, rendered)
        except Exception as exc:  # noqa: BLE001 - this request fails, the others go on
            return _finish_failed(state, exc)
        assert drawn.batch is not None
        timings = {
            "queued_s": max(0.0, drawn.started - state.received_at),
            "engine_s": drawn.engine_s,
            "postprocess_s": prepare_s + time.perf_counter() - t1,
        }
        return Outcome(
            result=GenerateResult(
                images=results,
                batch=drawn.batch,
                timings=timings,
                model=self.model_name,
                model_version=self.model_version,
                sampler=state.request.sampler,
                steps=state.request.steps,
                cost=request_cost(state.request),
                warnings=self.prompt_warnings(state.request.prompt) if self.prompt_warnings else [],
            )
        )

    def _store(self, state: RequestState, images: list[Image.Image],
               rendered: list[Future[tuple[bytes, bytes]]] | None = None) -> list[ImageResult]:
        r = state.request
        out = []
        for i, (image, seed) in enumerate(zip(images, r.sample_seeds())):
            full, thumb = rendered[i].result() if rendered else render(image, r.postprocess, self.png_compression)
            key = f"{state.id}/{i}.png"
            thumb_key = f"{state.id}/{i}.thumb.png"
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


def _images(states: list[RequestState]) -> int:
    return sum(state.request.num_images for state in states)


def _fit(states: list[RequestState], limit: int) -> list[list[RequestState]]:
    """Consecutive parts of at most ``limit`` images (a larger request alone)."""
    parts: list[list[RequestState]] = []
    size = 0
    for state in states:
        n = state.request.num_images
        if parts and size + n <= limit:
            parts[-1].append(state)
            size += n
        else:
            parts.append([state])
            size = n
    return parts


def _finish_failed(state: RequestState, exc: Exception) -> Outcome:
    log.error("request %s: its images could not be rendered or stored", state.id, exc_info=exc)
    return Outcome(error=as_generation_error(exc))


def as_generation_error(exc: Exception) -> GenerationError:
    if isinstance(exc, GenerationError):
        return exc
    return GenerationError(f"{type(exc).__name__}: {exc}")
