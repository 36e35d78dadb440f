"""Run one request in the calling process (no broker, no batching wait).

Used when the task is called directly and by the benchmarks as the
in-process reference for the queue path's overhead.
"""
from __future__ import annotations

import uuid
from typing import Any

from imagegenx.pipeline import BatchPipeline, resolve_request
from imagegenx.pipeline_factory import build_pipeline
from imagegenx.request_state import RequestState
from imagegenx.schemas import GenerateRequest
from imagegenx.settings import Settings


_pipelines: dict[int, BatchPipeline] = {}


def _pipeline(settings: Settings) -> BatchPipeline:
    cached = _pipelines.get(id(settings))
    if cached is not None:
        return cached
    pipeline = build_pipeline(settings)
    _pipelines[id(settings)] = pipeline
    return pipeline


def run_one(app: Any, request: dict[str, Any], task_id: str | None = None) -> dict[str, Any]:
    settings: Settings = app.imagegenx_settings
    pipeline = _pipeline(settings)
    parsed = GenerateRequest.model_validate(request, context={"limits": settings.limits})
    state = RequestState(task_id or uuid.uuid4().hex, resolve_request(parsed, pipeline.engine.native_size))
    outcome = pipeline.run([state])[state.id]
    if outcome.error is not None:
        raise outcome.error
    assert outcome.result is not None
    return outcome.result.model_dump(mode="json")
