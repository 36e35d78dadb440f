"""Every error leaves the API as JSON with a reason; no stack traces."""
from __future__ import annotations

import logging
from typing import Any

from flask import Flask, current_app, jsonify
from flask_limiter.errors import RateLimitExceeded
from pydantic import ValidationError
from redis.exceptions import RedisError
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from imagegenx.schemas import error_reason

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
        out.append({"field": loc, "reason": error_reason(err)})
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

    @app.errorhandler(RateLimitExceeded)
    def _rate_limited(exc: RateLimitExceeded):  # type: ignore[no-untyped-def]
        from imagegenx.api.ratelimit import retry_after_s

        svc = current_app.extensions["imagegenx"]
        wait = retry_after_s(svc.limiter)
        resp = jsonify({"error": exc.description, "retry_after_s": wait})
        resp.status_code = 429
        resp.headers["Retry-After"] = str(wait)
        return resp

    @app.errorhandler(RedisError)
    def _redis_down(exc: RedisError):  # type: ignore[no-untyped-def]
        # Raised outside the views' own handling (e.g. by the rate limiter's
        # storage): Redis is down or hung, which is a 503, never a 500.
        log.warning("redis unavailable: %s: %s", type(exc).__name__, exc)
        retry = current_app.extensions["imagegenx"].settings.retry_after_s
        resp = jsonify({"error": f"queue unavailable: {type(exc).__name__}"})
        resp.status_code = 503
        resp.headers["Retry-After"] = str(retry)
        return resp

    @app.errorhandler(RequestEntityTooLarge)
    def _too_large(exc: RequestEntityTooLarge):  # type: ignore[no-untyped-def]
        limit = current_app.config["MAX_CONTENT_LENGTH"]
        return jsonify({"error": f"body too large: at most {limit} bytes (max_body_bytes)",
                        "max_body_bytes": limit}), 413

    @app.errorhandler(HTTPException)
    def _http(exc: HTTPException):  # type: ignore[no-untyped-def]
        return jsonify({"error": exc.description or exc.name}), exc.code or 500

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception):  # type: ignore[no-untyped-def]
        log.exception("unhandled error")
        return jsonify({"error": "internal error"}), 500
