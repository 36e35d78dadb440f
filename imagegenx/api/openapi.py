"""OpenAPI 3.1 document built from the pydantic models the API really uses.

Server-side bounds (prompt length, sizes, steps...) are configurable, so they
are written into the request schema from the running settings: clients and
fuzzers see the limits this server enforces.
"""
from __future__ import annotations

from typing import Any

from flask import Blueprint, jsonify
from pydantic.json_schema import models_json_schema

from imagegenx import __version__
from imagegenx.api.services import services
from imagegenx.schemas import (
    ErrorResponse,
    GenerateRequest,
    Limits,
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
    props["guidance_scale"]["maximum"] = limits.max_guidance


def _error(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {
        "schema": {"$ref": REF.format(model="ErrorResponse")}}}}


def build_spec(limits: Limits) -> dict[str, Any]:
    _, defs = models_json_schema(
        [(m, "validation") for m in (GenerateRequest, SubmitResponse, TaskStatus, ErrorResponse)],
        ref_template=REF,
    )
    schemas = defs["$defs"]
    _apply_limits(schemas["GenerateRequest"], limits)
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
                "requestBody": {"required": True, "content": {"application/json": {
                    "schema": {"$ref": REF.format(model="GenerateRequest")}}}},
                "responses": {
                    "202": {"description": "queued", "content": {"application/json": {
                        "schema": {"$ref": REF.format(model="SubmitResponse")}}}},
                    "400": _error("body is not a JSON object"),
                    "401": _error("missing or invalid API key"),
                    "413": _error("body too large"),
                    "422": _error("invalid fields, each named with the reason"),
                    "503": _error("queue unavailable"),
                },
            }},
            "/api/v1/tasks/{task_id}": {
                "parameters": [task_id],
                "get": {"summary": "State, progress and result of a task", "operationId": "getTask",
                        "security": secured,
                        "responses": {"200": status, "401": _error("missing or invalid API key"),
                                      "404": _error("no such task for this key"),
                                      "503": _error("result backend unavailable")}},
                "delete": {"summary": "Revoke a task", "operationId": "revokeTask",
                           "security": secured,
                           "responses": {"202": status, "401": _error("missing or invalid API key"),
                                         "404": _error("no such task for this key"),
                                         "409": _error("task already finished")}},
            },
            "/api/v1/files/{key}": {"get": {
                "summary": "A stored image", "operationId": "getFile",
                "parameters": [{"name": "key", "in": "path", "required": True,
                                "schema": {"type": "string"}}],
                "responses": {"200": {"description": "PNG image",
                                      "content": {"image/png": {"schema": {"type": "string",
                                                                           "format": "binary"}}}},
                              "404": _error("no such file")},
            }},
            "/healthz": {"get": {
                "summary": "Redis and worker reachability", "operationId": "health",
                "responses": {"200": {"description": "healthy"}, "503": {"description": "degraded"}},
            }},
        },
    }


@bp.get("/api/v1/openapi.json")
def openapi_json():  # type: ignore[no-untyped-def]
    return jsonify(build_spec(services().settings.limits))
