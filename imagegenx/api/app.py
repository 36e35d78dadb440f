"""Application factory."""
from __future__ import annotations

import logging

from celery import Celery
from flask import Flask

from imagegenx.api.cost_limits import CostBudget
from imagegenx.api.errors import register_error_handlers
from imagegenx.api.files import bp as files_bp
from imagegenx.api.health import bp as health_bp
from imagegenx.api.images import bp as images_bp
from imagegenx.api.metrics import bp as metrics_bp
from imagegenx.api.models import bp as models_bp
from imagegenx.api.openapi import bp as openapi_bp
from imagegenx.api.playground import bp as playground_bp
from imagegenx.api.queue_status import bp as queue_bp
from imagegenx.api.ratelimit import build_limiter
from imagegenx.api.services import build_services
from imagegenx.api import task_stream  # noqa: F401 - adds /tasks/<id>/events to tasks_bp
from imagegenx.api.task_status import bp as tasks_bp
from imagegenx.api.workers import bp as workers_bp
from imagegenx.settings import Settings, get_settings

log = logging.getLogger(__name__)


def create_app(settings: Settings | None = None, celery_app: Celery | None = None) -> Flask:
    settings = settings or get_settings()
    app = Flask("imagegenx")
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.json.sort_keys = False  # type: ignore[attr-defined]
    svc = build_services(settings, celery_app)
    app.extensions["imagegenx"] = svc
    if not settings.key_digests():
        log.warning("no API keys configured (IMAGEGENX_API_KEYS): every request gets 401")
    register_error_handlers(app)
    svc.limiter = build_limiter(app, svc, images_bp, tasks_bp, workers_bp, health_bp, queue_bp,
                                  models_bp)
    svc.cost_budget = CostBudget(svc.redis, settings.cost_budget_per_minute)
    for bp in (images_bp, tasks_bp, files_bp, health_bp, openapi_bp, playground_bp, workers_bp,
               metrics_bp, queue_bp, models_bp):
        app.register_blueprint(bp)
    return app
