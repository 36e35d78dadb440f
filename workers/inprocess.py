"""Run one request in the calling process (no broker, no batching wait).

Used when the task is called directly and by the benchmarks as the
in-process reference for the queue path's overhead.
"""
from __future__ import annotations

import uuid
from typing import Any

from imagegenx.engine import create_engine
from imagegenx.pipeline import BatchPipeline, Job, render_pool, resolve_request
from imagegenx.upscale import load_upscaler
from imagegenx.schemas import GenerateRequest
from imagegenx.settings import Settings
from imagegenx.storage import create_storage


_pipelines: dict[int, BatchPipeline] = {}


def _pipeline(settings: Settings) -> BatchPipeline:
    cached = _pipelines.get(id(settings))
    if cached is not None:
        return cached
    engine = create_engine(settings.engine, settings.model, settings.device, settings.dtype,
                           settings.synthetic_cost, model_config_dir=settings.model_config_dir,
                           lora_dir=settings.lora_dir)
    upscaler = load_upscaler(settings.upscaler_model, getattr(engine, "device", settings.device),
                             getattr(engine, "dtype", settings.dtype), executor=render_pool())
    pipeline = BatchPipeline(engine, create_storage(settings), settings.public_base,
                             settings.served_model_name, upscaler=upscaler)
    _pipelines[id(settings)] = pipeline
    return pipeline


def run_one(app: Any, request: dict[str, Any], task_id: str | None = None) -> dict[str, Any]:
    settings: Settings = app.imagegenx_settings
    pipeline = _pipeline(settings)
    parsed = GenerateRequest.model_validate(request, context={"limits": settings.limits})
    job = Job(id=task_id or uuid.uuid4().hex, request=resolve_request(parsed, pipeline.engine.native_size))
    outcome = pipeline.run([job])[job.id]
    if outcome.error is not None:
        raise outcome.error
    assert outcome.result is not None
    return outcome.result.model_dump(mode="json")
