"""OpenAPI 3.1 document built from the pydantic models the API really uses.

Server-side bounds (prompt length, sizes, steps...) are configurable, so they
are written into the request schema from the running settings: clients and
fuzzers see the limits this server enforces.
"""
from __future__ import annotations

from typing import Any, get_args

from flask import Blueprint, jsonify
from pydantic.json_schema import models_json_schema

from imagegenx import __version__
from imagegenx.api.services import services
from imagegenx.lora_catalog import LoraCatalog
from imagegenx.api.models import ModelsResponse
from imagegenx.api.queue_status import QueueResponse
from imagegenx.api.task_stream import PreviewEvent, QueuedEvent, StartedEvent
from imagegenx.api.workers import WorkersResponse
from imagegenx.storage import MAX_KEY_CHARS
from imagegenx.schemas import (
    MAX_SEED,
    ErrorResponse,
    GenerateRequest,
    Limits,
    Postprocess,
    Progress,
    SubmitResponse,
    TaskStatus,
)

bp = Blueprint("openapi", __name__)

REF = "#/components/schemas/{model}"


def _apply_limits(schema: dict[str, Any], limits: Limits) -> None:
    props = schema["properties"]
    for name in ("prompt", "negative_prompt"):
        props[name]["maxLength"] = limits.max_prompt_chars
    for name in ("width", "height"):
        props[name]["anyOf"][0].update(minimum=limits.min_size, maximum=limits.max_size,
                                       multipleOf=8)
    props["steps"]["maximum"] = limits.max_steps
    props["num_images"]["maximum"] = limits.max_num_images
    props["priority"]["maximum"] = limits.max_priority
    props["guidance_scale"]["maximum"] = limits.max_guidance
    interval = props["guidance_interval"]
    for item in interval["anyOf"][0]["prefixItems"]:
        item.update(minimum=0, maximum=1)
    start, end = limits.guidance_interval
    interval["description"] += f" ({start:g}, {end:g} on this server); start must be less than end"
    # Image i uses seed + i, which must stay a 32-bit seed: the largest seed
    # allowed depends on num_images.
    schema["allOf"] = [
        {"if": {"properties": {"num_images": {"const": n}}, "required": ["num_images"]},
         "then": {"properties": {"seed": {"anyOf": [{"type": "integer", "maximum": MAX_SEED - n + 1},
                                                    {"type": "null"}]}}}}
        for n in range(2, limits.max_num_images + 1)
    ]
    schema["allOf"] += _upscale_rules(limits)
    # Surrounding whitespace is stripped: a prompt needs a non-space character.
    props["prompt"]["pattern"] = r"\S"
    props["callback_url"]["anyOf"][0].update(
        format="uri", pattern=r"^https?://[^\s/?#@]+",
        description="http(s) URL POSTed the task's status when it finishes (signed, see "
                    "webhooks.taskFinished). Private, loopback, link-local and cloud-metadata "
                    "addresses are refused: literal ones here (422), names after resolution at "
                    "delivery (webhook.state 'refused'), unless allow-listed by the server.",
    )


def _upscale_rules(limits: Limits) -> list[dict[str, Any]]:
    """An upscaled side may not pass max_upscaled_side: a factor that max_size
    would break needs width and height set, small enough."""
    rules = []
    for factor in get_args(Postprocess.model_fields["upscale"].annotation):
        cap = limits.max_upscaled_side // factor
        if factor == 1 or cap >= limits.max_size:
            continue
        rules.append({
            "if": {"properties": {"postprocess": {"properties": {"upscale": {"const": factor}},
                                                  "required": ["upscale"]}},
                   "required": ["postprocess"]},
            "then": {"required": ["width", "height"],
                     "properties": {n: {"type": "integer", "maximum": cap} for n in ("width", "height")}},
        })
    return rules


def _limited(description: str) -> dict[str, Any]:
    """An error answer that tells the client when to come back."""
    return {**_error(description), "headers": {"Retry-After": {
        "description": "seconds to wait before retrying", "schema": {"type": "integer"}}}}


def _error(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {
        "schema": {"$ref": REF.format(model="ErrorResponse")}}}}


def _apply_loras(schema: dict[str, Any], loras: list[str]) -> None:
    """The LoRA names this server serves: the only values ``lora`` accepts (none: only null)."""
    prop = schema["properties"]["lora"]
    if not loras:
        schema["properties"]["lora"] = {"type": "null", "default": None, "title": prop.get("title"),
                                        "description": "no LoRA is served by this server"}
        return
    one, many = prop["anyOf"][0], prop["anyOf"][1]
    one["enum"] = list(loras)
    many["items"]["enum"] = list(loras)


def _apply_models(schema: dict[str, Any], models: list[str]) -> None:
    """The served model names: the only values ``model`` accepts; the first is the default."""
    prop = schema["properties"]["model"]
    prop["anyOf"][0]["enum"] = list(models)
    prop["description"] = f"a served model (GET /api/v1/models); default: {models[0]}"


def build_spec(limits: Limits, loras: list[str] | None = None,
               models: list[str] | None = None) -> dict[str, Any]:
    """The OpenAPI document with this server's limits and, when given, its LoRA and model names."""
    _, defs = models_json_schema(
        [(m, "validation") for m in (GenerateRequest, SubmitResponse, TaskStatus, ErrorResponse)]
        + [(WorkersResponse, "serialization"), (QueueResponse, "serialization"),
           (ModelsResponse, "serialization")]
        + [(m, "serialization") for m in (QueuedEvent, StartedEvent, Progress, PreviewEvent)],
        ref_template=REF,
    )
    schemas = defs["$defs"]
    _apply_limits(schemas["GenerateRequest"], limits)
    if loras is not None:
        _apply_loras(schemas["GenerateRequest"], loras)
    if models:
        _apply_models(schemas["GenerateRequest"], models)
    task_id = {"name": "task_id", "in": "path", "required": True,
               "schema": {"type": "string", "format": "uuid"}}
    status = {"description": "task state", "content": {"application/json": {
        "schema": {"$ref": REF.format(model="TaskStatus")}}}}
    secured = [{"ApiKey": []}]
    return {
        "openapi": "3.1.0",
        "info": {"title": "ImageGenX", "version": __version__,
                 "description": "Batching text-to-image generation."},
        "components": {
            "schemas": schemas,
            "securitySchemes": {"ApiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"}},
        },
        "paths": {
            "/api/v1/images": {"post": {
                "summary": "Queue an image generation request",
                "operationId": "submit",
                "security": secured,
                "parameters": [{
                    "name": "Idempotency-Key", "in": "header", "required": False,
                    "description": "makes retries safe: within the results' lifetime the same key "
                                   "(per API key) with the same body returns the first task (200), "
                                   "with another body 409",
                    "schema": {"type": "string", "minLength": 1, "maxLength": 128,
                               "pattern": "^[\\x20-\\x7e]+$"}}],
                "requestBody": {"required": True, "content": {"application/json": {
                    "schema": {"$ref": REF.format(model="GenerateRequest")}}}},
                "responses": {
                    "202": {"description": "queued; or, with cached true, answered from the result "
                                           "cache: the task is already SUCCESS with the images of an "
                                           "identical earlier request of this API key (a seed given, "
                                           "cache on; not charged to the cost budget; a callback_url gets "
                                           "its completed webhook)",
                            "content": {"application/json": {
                        "schema": {"$ref": REF.format(model="SubmitResponse")}}}},
                    "200": {"description": "an earlier submission with this Idempotency-Key and "
                                           "body: its task", "content": {"application/json": {
                        "schema": {"$ref": REF.format(model="SubmitResponse")}}}},
                    "400": _error("body is not a JSON object, or a bad Idempotency-Key header"),
                    "401": _error("missing or invalid API key"),
                    "409": _error("Idempotency-Key already used with another body (body: task_id)"),
                    "413": _error("body larger than max_body_bytes (body: the limit, max_body_bytes)"),
                    "422": _error("invalid fields, each named with the reason (an unknown model "
                                  "lists the served ones); a request costing "
                                  "more than max_request_cost names the field cost (body: cost, "
                                  "max_cost); a priority above this key's key_max_priority names "
                                  "priority"),
                    "429": _limited("rate limit, cost budget or unfinished tasks of this API key "
                                    "exceeded (cost budget: the body has cost, budget_per_minute, "
                                    "retry_after_s and frees_at; unfinished tasks: unfinished, "
                                    "max_unfinished, retry_after_s)"),
                    "503": _limited("queue full (max_queue_depth), the model has no live worker "
                                    "and max_queue_without_worker requests wait for it (body: "
                                    "model, queue_depth), or the queue is unavailable"),
                },
            }},
            "/api/v1/tasks/{task_id}": {
                "parameters": [task_id],
                "get": {"summary": "State, progress and result of a task", "operationId": "getTask",
                        "security": secured,
                        "responses": {"200": status, "401": _error("missing or invalid API key"),
                                      "404": _error("no such task for this key"),
                                      "429": _limited("rate limit of this API key exceeded"),
                                      "503": _limited("result backend unavailable")}},
                "delete": {"summary": "Revoke a task", "operationId": "revokeTask",
                           "security": secured,
                           "responses": {"202": status, "401": _error("missing or invalid API key"),
                                         "404": _error("no such task for this key"),
                                         "409": _error("task already finished"),
                                         "429": _limited("rate limit of this API key exceeded"),
                                         "503": _limited("broker unavailable")}},
            },
            "/api/v1/tasks/{task_id}/events": {
                "parameters": [task_id],
                "get": {
                    "summary": "The task's events as server-sent events, until it ends",
                    "description": (
                        "text/event-stream, one JSON data line per event: queued (no id; "
                        "QueuedEvent), started (StartedEvent), progress (Progress), preview "
                        "(PreviewEvent, when the worker draws previews), then one of succeeded, "
                        "failed, revoked whose data is exactly what GET /api/v1/tasks/{task_id} "
                        "returns (TaskStatus), and the stream closes. Event ids are Redis Stream "
                        "ids: reconnecting with Last-Event-ID gets the events after it, none "
                        "twice; after the final event, 204. Comment lines (': keep-alive') keep "
                        "an idle stream open; the server closes a stream after "
                        "events_max_stream_s and the client resumes."),
                    "operationId": "taskEvents",
                    "security": secured,
                    "parameters": [
                        {"name": "Last-Event-ID", "in": "header", "required": False,
                         "description": "the id of the last event received: resume after it",
                         "schema": {"type": "string", "pattern": "^[0-9]+-[0-9]+$"}},
                        {"name": "last_event_id", "in": "query", "required": False,
                         "description": "the same as the Last-Event-ID header",
                         "schema": {"type": "string", "pattern": "^[0-9]+-[0-9]+$"}}],
                    "x-events": {
                        "queued": {"$ref": REF.format(model="QueuedEvent")},
                        "started": {"$ref": REF.format(model="StartedEvent")},
                        "progress": {"$ref": REF.format(model="Progress")},
                        "preview": {"$ref": REF.format(model="PreviewEvent")},
                        **{name: {"$ref": REF.format(model="TaskStatus")}
                           for name in ("succeeded", "failed", "revoked")}},
                    "responses": {
                        "200": {"description": "the event stream", "content": {
                            "text/event-stream": {"schema": {"type": "string"}}}},
                        "204": {"description": "the final event was already delivered "
                                               "(Last-Event-ID at or after it)"},
                        "401": _error("missing or invalid API key"),
                        "404": _error("no such task for this key"),
                        "429": _limited("rate limit of this API key exceeded"),
                        "503": _limited("event stream unavailable")}},
            },
            "/api/v1/files/{key}": {"get": {
                "summary": "A stored image", "operationId": "getFile",
                "parameters": [{"name": "key", "in": "path", "required": True,
                                "schema": {"type": "string", "maxLength": MAX_KEY_CHARS}}],
                "responses": {"200": {"description": "PNG image",
                                      "content": {"image/png": {"schema": {"type": "string",
                                                                           "format": "binary"}}}},
                              "302": {"description": "S3 storage: redirect to a freshly presigned URL"},
                              "404": _error("no such file")},
            }},
            "/api/v1/workers": {"get": {
                "summary": "Live workers: GPU, buffered and running requests, batch statistics",
                "description": "Workers that answer within workers_inspect_timeout_s; the others "
                               "are absent.",
                "operationId": "listWorkers",
                "security": secured,
                "responses": {"200": {"description": "the workers that answered",
                                      "content": {"application/json": {"schema": {
                                          "$ref": REF.format(model="WorkersResponse")}}}},
                              "401": _error("missing or invalid API key"),
                              "503": _error("broker unavailable")},
            }},
            "/api/v1/models": {"get": {
                "summary": "Served models: queue, depth, live workers and their versions, native "
                           "size, samplers, LoRAs",
                "description": "Workers are those that answer within workers_inspect_timeout_s; a "
                               "worker drained with cancel_consumer is listed with consuming false "
                               "until it stops.",
                "operationId": "listModels",
                "security": secured,
                "responses": {"200": {"description": "the served models, the default first",
                                      "content": {"application/json": {"schema": {
                                          "$ref": REF.format(model="ModelsResponse")}}}},
                              "401": _error("missing or invalid API key"),
                              "429": _limited("rate limit of this API key exceeded"),
                              "503": _limited("broker unavailable")},
            }},
            "/api/v1/queue": {"get": {
                "summary": "Scaling signals: queue depth and oldest age, worker capacity, drain time",
                "description": "Drain estimate: waiting requests x mean steps x num_images of the "
                               "oldest waiting messages / the live workers' measured image-steps "
                               "per second (UNet time only: a lower bound).",
                "operationId": "queueStatus",
                "security": secured,
                "responses": {"200": {"description": "the queues and the workers that answered",
                                      "content": {"application/json": {"schema": {
                                          "$ref": REF.format(model="QueueResponse")}}}},
                              "401": _error("missing or invalid API key"),
                              "503": _limited("broker unavailable")},
            }},
            "/metrics": {"get": {
                "summary": "Prometheus metrics: API requests and queue depth", "operationId": "metrics",
                "responses": {"200": {"description": "Prometheus text format", "content": {
                    "text/plain": {"schema": {"type": "string"}}}}},
            }},
            "/healthz": {"get": {
                "summary": "Redis and worker reachability", "operationId": "health",
                "parameters": [{"name": "ready", "in": "query", "required": False,
                                "allowEmptyValue": True, "schema": {"type": "string"},
                                "description": "readiness: also 503 when the queue's drain "
                                               "estimate passes ready_max_drain_s"}],
                "responses": {"200": {"description": "healthy"}, "503": {"description": "degraded"}},
            }},
        },
        "webhooks": {"taskFinished": {"post": {
            "summary": "Sent to callback_url when the task ends in SUCCESS or FAILURE, and on "
                       "the other events the request's callback_events names",
            "description": "Body: the task's status (task_id, state, progress, result, error) "
                           "and event: completed (the default), or started and progress (at "
                           "most one every 500 ms) when callback_events asks for them; "
                           "X-ImageGenX-Delivery is the task id for completed, "
                           "<task id>:started:0 and <task id>:progress:<step> for the others. "
                           "Verify "
                           "X-ImageGenX-Signature = 'sha256=' + hex HMAC-SHA256(secret, "
                           "X-ImageGenX-Timestamp + '.' + raw body) and refuse old timestamps. "
                           "Retried with exponential backoff on network errors, 408, 425, 429 "
                           "and 5xx; X-ImageGenX-Delivery (the task id) is the same on every "
                           "attempt. Redirects are not followed.",
            "parameters": [
                {"name": "X-ImageGenX-Signature", "in": "header", "required": True,
                 "schema": {"type": "string", "pattern": "^sha256=[0-9a-f]{64}$"}},
                {"name": "X-ImageGenX-Timestamp", "in": "header", "required": True,
                 "schema": {"type": "string", "pattern": "^[0-9]+$"}},
                {"name": "X-ImageGenX-Delivery", "in": "header", "required": True,
                 "schema": {"type": "string"}},
            ],
            "requestBody": {"required": True, "content": {"application/json": {
                "schema": {"allOf": [{"$ref": REF.format(model="TaskStatus")}, {
                    "type": "object", "required": ["event"], "properties": {"event": {
                        "type": "string", "enum": ["started", "progress", "completed"]}}}]}}}},
            "responses": {"2XX": {"description": "received; any other answer is a failed attempt"}},
        }}},
    }


@bp.get("/api/v1/openapi.json")
def openapi_json():  # type: ignore[no-untyped-def]
    settings = services().settings
    return jsonify(build_spec(settings.limits, LoraCatalog(settings.lora_dir).names(),
                              list(settings.served_models)))
