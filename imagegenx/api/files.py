"""GET /api/v1/files/<key>: stored images. Keys are checked; no path escapes."""
from __future__ import annotations

from flask import Blueprint, send_file

from imagegenx.api.errors import ApiError
from imagegenx.api.services import services
from imagegenx.storage import InvalidKey, LocalStorage

bp = Blueprint("files", __name__, url_prefix="/api/v1")


@bp.get("/files/<path:key>")
def get_file(key: str):  # type: ignore[no-untyped-def]
    storage = LocalStorage(services().settings.storage_root)
    try:
        path = storage.path(key)
    except InvalidKey:
        raise ApiError(404, "no such file") from None
    if not path.is_file():
        raise ApiError(404, "no such file")
    return send_file(path, mimetype="image/png", max_age=86400)
