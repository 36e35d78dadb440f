"""Per-key rate limits (flask-limiter), counted in Redis so that every API
process and host shares them.

The key is the digest of the caller's API key, never the client address
(except /healthz, which takes no key: counted per address, in memory):
clients behind one proxy do not share a budget, and one key cannot dodge
its budget by changing address. Requests without a valid key are not
counted; they get 401 from the view.
"""
from __future__ import annotations

import math
import time

from flask import Blueprint, Flask
from flask_limiter import Limiter
from flask_limiter.util import get_remote_address

from imagegenx.api.guards import caller_digest
from imagegenx.api.services import Services

STRATEGY = "sliding-window-counter"


def _key() -> str:
    return caller_digest() or ""


def _no_valid_key() -> bool:
    return caller_digest() is None


def build_limiter(app: Flask, svc: Services, submit_bp: Blueprint, status_bp: Blueprint,
                  workers_bp: Blueprint, health_bp: Blueprint,
                  queue_bp: Blueprint, models_bp: Blueprint | None = None) -> Limiter:
    """A limiter for this app, counting in the broker's Redis through the API's
    own connection pool (same timeouts: a dead Redis answers 503 fast)."""
    limiter = Limiter(
        key_func=_key,
        # The URI only selects Redis storage: the pool (Sentinel-aware) does the rest.
        storage_uri="redis://",
        storage_options={"connection_pool": svc.redis.connection_pool},
        strategy=STRATEGY,
        key_prefix="imagegenx",
        # A storage error is a Redis outage: answered 503 by the error handler.
        swallow_errors=False,
        headers_enabled=False,
    )
    limiter.init_app(app)
    # One budget per blueprint and key (reads and revokes of tasks share theirs).
    for value, bp, what in ((svc.settings.rate_limit, submit_bp, "submissions"),
                            (svc.settings.status_rate_limit, status_bp, "task requests"),
                            (svc.settings.workers_rate_limit, workers_bp, "worker listings"),
                            # the queue status asks every worker too
                            (svc.settings.workers_rate_limit, queue_bp, "queue listings"),
                            *(((svc.settings.workers_rate_limit, models_bp, "model listings"),)
                              if models_bp is not None else ())):
        if value:
            limiter.shared_limit(
                value, scope=bp.name, exempt_when=_no_valid_key,
                error_message=f"rate limit of {what} for this API key exceeded ({value})")(bp)
    limit_health_checks(app, svc.settings.health_rate_limit, health_bp)
    return limiter


def limit_health_checks(app: Flask, value: str, health_bp: Blueprint) -> None:
    """Health checks carry no key: counted per client address, in this process's
    memory, so that with Redis down /healthz still answers what is wrong."""
    if not value:
        return
    limiter = Limiter(key_func=get_remote_address, storage_uri="memory://", strategy=STRATEGY,
                      key_prefix="imagegenx-health", headers_enabled=False)
    limiter.init_app(app)
    limiter.shared_limit(
        value, scope=health_bp.name,
        error_message=f"rate limit of health checks for this address exceeded ({value})")(health_bp)


def retry_after_s(limiter: Limiter) -> int:
    """Seconds until the breached window lets the key in again (at least 1)."""
    current = limiter.current_limit
    if current is None:
        return 1
    try:
        return max(1, math.ceil(current.window.reset_time - time.time()))
    except Exception:  # noqa: BLE001 - the 429 must go out even if this fails
        return 1
