"""What the blueprints need: settings, the Celery app, a Redis client.

Kept on ``app.extensions`` so tests can build apps with their own settings.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import redis
from celery import Celery
from flask import current_app

from imagegenx.settings import Settings

OWNER_PREFIX = "imagegenx:owner:"


@dataclass
class Services:
    settings: Settings
    celery: Celery
    redis: redis.Redis
    key_digests: frozenset[str]

    def owner_key(self, task_id: str) -> str:
        return OWNER_PREFIX + task_id


def build_services(settings: Settings, celery_app: Celery | None = None) -> Services:
    if celery_app is None:
        from tasks import create_celery_app

        celery_app = create_celery_app(settings)
    client = redis.Redis.from_url(
        settings.broker_url, socket_connect_timeout=0.5, socket_timeout=1.0,
        health_check_interval=10,
    )
    return Services(settings, celery_app, client, settings.key_digests())


def services() -> Services:
    svc: Any = current_app.extensions["imagegenx"]
    return svc
