"""What the blueprints need: settings, the Celery app, a Redis client.

Kept on ``app.extensions`` so tests can build apps with their own settings.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import redis
from celery import Celery
from flask import current_app

from imagegenx.ownership import TaskOwners
from imagegenx.redis_client import redis_client
from imagegenx.settings import Settings
from imagegenx.webhooks import DeliveryRecord

OWNER_PREFIX = "imagegenx:owner:"


@dataclass
class Services:
    settings: Settings
    celery: Celery
    redis: redis.Redis
    key_digests: frozenset[str]
    limiter: Any = None  # flask_limiter.Limiter, set by create_app
    owners: Any = None  # TaskOwners: Redis, plus the database of a db+ result backend
    cost_budget: Any = None  # imagegenx.api.cost_limits.CostBudget, set by create_app

    def owner_key(self, task_id: str) -> str:
        return OWNER_PREFIX + task_id

    @property
    def webhooks(self) -> DeliveryRecord:
        return DeliveryRecord(self.redis, self.settings.result_expires_s)


def build_services(settings: Settings, celery_app: Celery | None = None) -> Services:
    if celery_app is None:
        from imagegenx.celery_client import client_app

        celery_app = client_app(settings)  # the worker's code stays out of the API process
    # Short timeouts: with Redis down or hung, every endpoint answers 503 well
    # within a second instead of holding a request thread.
    client = redis_client(
        settings.broker_url, settings.sentinel_master, socket_connect_timeout=0.5,
        socket_timeout=0.5, health_check_interval=10,
    )
    owners = TaskOwners(client, settings.result_expires_s, settings.result_backend)
    return Services(settings, celery_app, client, settings.key_digests(), owners=owners)


def services() -> Services:
    svc: Any = current_app.extensions["imagegenx"]
    return svc
