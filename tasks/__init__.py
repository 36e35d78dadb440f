"""The Celery app and task definitions: the API <-> worker contract.

``celery -A tasks worker`` starts a batching worker configured from this app
(pool, concurrency and prefetch included); ``celery -A tasks inspect ...`` and
``celery -A tasks flower`` work against the same app.
"""
from tasks.celery_app import app, create_celery_app
from tasks.generate import GENERATE_TASK, generate
from tasks.webhooks import WEBHOOK_TASK, deliver_webhook

__all__ = ["GENERATE_TASK", "WEBHOOK_TASK", "app", "create_celery_app", "deliver_webhook", "generate"]
