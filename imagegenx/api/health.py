"""GET /healthz: is Redis reachable, does any worker answer."""
from __future__ import annotations

from flask import Blueprint, current_app, jsonify, request
from kombu.exceptions import OperationalError
from redis.exceptions import RedisError

from imagegenx.api.queue_status import snapshot
from imagegenx.api.services import Services, services
from imagegenx.api.worker_presence import WorkerPresence

bp = Blueprint("health", __name__)
# A worker answers a ping within this even while it is busy drawing.
PING_TIMEOUT_S = 1.0
# How long a ping's answer is reused (one ping per API process in that time).
PING_MAX_AGE_S = 2.0


def worker_presence() -> WorkerPresence:
    """The app's worker presence, made once per app."""
    ext = current_app.extensions
    if "imagegenx.presence" not in ext:
        control = services().celery.control

        def ping() -> list[str]:
            replies = control.ping(timeout=PING_TIMEOUT_S) or []
            return [name for reply in replies for name in reply]

        ext.setdefault("imagegenx.presence", WorkerPresence(ping, PING_MAX_AGE_S))
    presence: WorkerPresence = ext["imagegenx.presence"]
    return presence


@bp.get("/healthz")
def healthz():  # type: ignore[no-untyped-def]
    svc = services()
    try:
        redis_ok = bool(svc.redis.ping())
    except RedisError:
        redis_ok = False
    workers = worker_presence().workers() if redis_ok else []
    ok = redis_ok and bool(workers)
    body = {"status": "ok" if ok else "degraded", "redis": redis_ok, "workers": workers}
    limit = svc.settings.ready_max_drain_s
    if ok and limit and "ready" in request.args:
        drain = _drain_s(svc)
        body["drain_s"] = drain
        if drain is not None and drain > limit:
            ok = False
            body["status"] = f"busy: the queue drains in about {drain:g} s (limit {limit:g} s)"
    return jsonify(body), 200 if ok else 503


def _drain_s(svc: Services) -> float | None:
    """The queue's drain estimate (None when it cannot be told or read)."""
    try:
        return snapshot(svc).drain.estimate_s
    except (RedisError, OperationalError, ConnectionError):
        return None
