"""GET /api/v1/files/<key>: stored images. Keys are checked; no path escapes.

Local storage: the file itself. S3 storage: a 302 redirect to a freshly
presigned URL of the object (404 when it does not exist), so an API file URL
keeps working after the presigned URLs in a result have expired.
"""
from __future__ import annotations

from flask import Blueprint, current_app, redirect, send_file

from imagegenx.api.errors import ApiError
from imagegenx.api.services import services
from imagegenx.storage import InvalidKey, LocalStorage, S3Storage, create_storage

bp = Blueprint("files", __name__, url_prefix="/api/v1")


def app_storage() -> LocalStorage | S3Storage:
    """The app's storage, made once per app (an S3 client is costly to build)."""
    ext = current_app.extensions
    if "imagegenx.storage" not in ext:
        ext["imagegenx.storage"] = create_storage(services().settings)
    storage: LocalStorage | S3Storage = ext["imagegenx.storage"]
    return storage


@bp.get("/files/<path:key>")
def get_file(key: str):  # type: ignore[no-untyped-def]
    storage = app_storage()
    try:
        if isinstance(storage, S3Storage):
            if not storage.exists(key):
                raise ApiError(404, "no such file")
            return redirect(storage.url(key), code=302)
        path = storage.path(key)
        # A key the file system cannot even look up (ENAMETOOLONG, ...) names no file either.
        found = path.is_file()
    except (InvalidKey, OSError):
        raise ApiError(404, "no such file") from None
    if not found:
        raise ApiError(404, "no such file")
    return send_file(path, mimetype="image/png", max_age=86400)
