"""Every error leaves the API as JSON with a reason; no stack traces."""
from __future__ import annotations

import logging
from typing import Any

from flask import Flask, jsonify
from pydantic import ValidationError
from werkzeug.exceptions import HTTPException

log = logging.getLogger(__name__)


class ApiError(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None,
                 **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}
        self.extra = extra


def field_errors(exc: ValidationError) -> list[dict[str, str]]:
    """One entry per bad field: its dotted path and the reason."""
    out = []
    for err in exc.errors(include_url=False, include_input=False):
        loc = ".".join(str(p) for p in err["loc"]) or "body"
        msg = err["msg"]
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        out.append({"field": loc, "reason": msg})
    return out


def register_error_handlers(app: Flask) -> None:
    @app.errorhandler(ApiError)
    def _api_error(exc: ApiError):  # type: ignore[no-untyped-def]
        resp = jsonify({"error": exc.message, **exc.extra})
        resp.status_code = exc.status
        resp.headers.update(exc.headers)
        return resp

    @app.errorhandler(ValidationError)
    def _validation(exc: ValidationError):  # type: ignore[no-untyped-def]
        return jsonify({"error": "invalid request", "fields": field_errors(exc)}), 422

    @app.errorhandler(HTTPException)
    def _http(exc: HTTPException):  # type: ignore[no-untyped-def]
        return jsonify({"error": exc.description or exc.name}), exc.code or 500

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception):  # type: ignore[no-untyped-def]
        log.exception("unhandled error")
        return jsonify({"error": "internal error"}), 500
