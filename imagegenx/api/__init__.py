"""Flask REST API (app factory + blueprints). Never imports torch.

``create_app`` is imported on first use, not with the package: gunicorn's master
imports ``imagegenx.api.gunicorn_conf`` before it forks, and its gevent workers
patch sockets, ``select`` and threads only after the fork. A module imported
before the patch keeps the blocking originals: kombu's poller then held a whole
worker process (every greenlet) for a one-second ``celery ping`` every two
seconds, and about 1% of API requests waited a second.
"""
from __future__ import annotations

from typing import Any

__all__ = ["create_app"]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from imagegenx.api.app import create_app

        return create_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
