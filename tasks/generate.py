"""The ``imagegenx.generate`` task: keyword arguments are the request JSON.

Inside a worker the task never runs one message at a time: its Strategy hands
every message to the batching consumer (``workers.strategy``). Calling the
task in-process (``generate.apply(kwargs=...)`` or ``generate(**request)``)
runs that one request through the same batch executor.
"""
from __future__ import annotations

from typing import Any

from celery import Task

from imagegenx.celery_client import GENERATE_TASK
from tasks.celery_app import app


class GenerateTask(Task):
    Strategy = "workers.strategy:batching_strategy"
    acks_late = True
    track_started = True
    # The worker stores results itself, per request, from its finishing thread.
    typing = False


@app.task(name=GENERATE_TASK, base=GenerateTask, bind=True)
def generate(self: Task, **request: Any) -> dict[str, Any]:
    from workers.inprocess import run_one

    return run_one(self.app, request, task_id=self.request.id)
