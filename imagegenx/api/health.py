"""GET /healthz: is Redis reachable, does any worker answer."""
from __future__ import annotations

from flask import Blueprint, jsonify
from redis.exceptions import RedisError

from imagegenx.api.services import services

bp = Blueprint("health", __name__)


@bp.get("/healthz")
def healthz():  # type: ignore[no-untyped-def]
    svc = services()
    try:
        redis_ok = bool(svc.redis.ping())
    except RedisError:
        redis_ok = False
    workers: list[str] = []
    if redis_ok:
        try:
            replies = svc.celery.control.ping(timeout=0.5) or []
            workers = sorted(name for reply in replies for name in reply)
        except Exception:  # noqa: BLE001 - health must answer, whatever broke
            workers = []
    ok = redis_ok and bool(workers)
    body = {"status": "ok" if ok else "degraded", "redis": redis_ok, "workers": workers}
    return jsonify(body), 200 if ok else 503
