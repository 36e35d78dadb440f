"""Request guards shared by the blueprints."""
from __future__ import annotations

from typing import Any

from flask import g, request

from imagegenx.api.auth import match_key
from imagegenx.api.errors import ApiError
from imagegenx.api.services import services


def caller_digest() -> str | None:
    """Digest of the caller's API key if it is accepted (computed once per request).

    The rate limiter keys on it too, so limits follow the key, not the address.
    """
    if "api_key_digest" not in g:
        g.api_key_digest = match_key(request.headers.get("X-API-Key"), services().key_digests)
    return g.api_key_digest  # type: ignore[no-any-return]


def require_key() -> str:
    """Digest of the caller's API key, or 401."""
    digest = caller_digest()
    if digest is None:
        raise ApiError(401, "missing or invalid API key (header X-API-Key)",
                       headers={"WWW-Authenticate": "X-API-Key"})
    return digest


def json_body() -> dict[str, Any]:
    """The request's JSON object, or 400/413."""
    if not request.is_json:
        raise ApiError(400, "body must be JSON (Content-Type: application/json)")
    try:
        body = request.get_json(silent=True)  # 413 is raised here past MAX_CONTENT_LENGTH
    except RecursionError:
        # The JSON decoder recurses once per level: a small body nested thousands deep.
        raise ApiError(400, "body is nested too deeply to be a request") from None
    if body is None:
        raise ApiError(400, "body is not valid JSON")
    if not isinstance(body, dict):
        raise ApiError(400, "body must be a JSON object")
    return body
