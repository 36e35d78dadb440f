"""A whole service for one test module: API over HTTP + a real worker process."""
from __future__ import annotations

import io
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests
from PIL import Image

from imagegenx.redis_client import redis_client
from imagegenx.settings import Settings
from tests.service import ApiServer, Worker, drop_queues, free_port, start_worker

API_KEY = "test-key-0123456789"
TEST_DB = 3


@dataclass
class Stack:
    settings: Settings
    env: dict[str, str]
    api: ApiServer
    worker: Worker
    celery: Any
    log_dir: Path

    @property
    def base(self) -> str:
        return self.api.base

    @property
    def headers(self) -> dict[str, str]:
        return {"X-API-Key": API_KEY}

    def submit(self, body: dict[str, Any]) -> str:
        """POST a generation request; its task id (the request must be accepted)."""
        r = requests.post(f"{self.base}/api/v1/images", json=body, headers=self.headers, timeout=10)
        assert r.status_code == 202, r.text
        return r.json()["task_id"]


def served_rgb(url: str) -> Image.Image:
    """A result image as the API serves it (must be a PNG), in RGB."""
    r = requests.get(url, timeout=10)
    assert r.status_code == 200 and r.headers["Content-Type"] == "image/png", r.status_code
    return Image.open(io.BytesIO(r.content)).convert("RGB")


def stack_env(redis_base: str, tmp: Path, model: Path | None, api_port: int,
              **extra: str) -> dict[str, str]:
    url = f"{redis_base}/{TEST_DB}"
    env = {
        "IMAGEGENX_PUBLIC_URL": f"http://127.0.0.1:{api_port}",
        "IMAGEGENX_BROKER_URL": url,
        "IMAGEGENX_RESULT_BACKEND": url,
        "IMAGEGENX_QUEUE": f"test-{uuid.uuid4().hex[:8]}",
        "IMAGEGENX_STORAGE_ROOT": str(tmp / "images"),
        "IMAGEGENX_API_KEYS": API_KEY,
        "IMAGEGENX_PROGRESS_INTERVAL_S": "0",
        "IMAGEGENX_EXPECTED_BATCH_S": "30",
        "IMAGEGENX_VISIBILITY_TIMEOUT_S": "600",
        # Tests poll fast with one key; the limits have their own tests.
        "IMAGEGENX_RATE_LIMIT": "",
        "IMAGEGENX_STATUS_RATE_LIMIT": "",
        "IMAGEGENX_MAX_REQUEST_COST": "0",
        "IMAGEGENX_COST_BUDGET_PER_MINUTE": "0",
        # Every request runs unless a test asks for the result cache ("cache": true).
        "IMAGEGENX_RESULT_CACHE": "false",
        # No fixed port per worker; tests that scrape a worker pass a free one.
        "IMAGEGENX_WORKER_METRICS_PORT": "0",
    }
    if model is not None:
        env["IMAGEGENX_MODEL"] = str(model)
        env["IMAGEGENX_ENGINE"] = "diffusion"
        env["IMAGEGENX_DEVICE"] = "cpu"
    env.update(extra)
    return env


def settings_from_env(env: dict[str, str]) -> Settings:
    fields = {k[len("IMAGEGENX_"):].lower(): v for k, v in env.items() if k.startswith("IMAGEGENX_")}
    return Settings(**fields)


@contextmanager
def running_stack(redis_base: str, tmp: Path, model: Path | None, name: str = "w1",
                  **extra: str) -> Iterator[Stack]:
    from imagegenx.api import create_app
    from tasks import create_celery_app

    port = free_port()
    env = stack_env(redis_base, tmp, model, port, **extra)
    settings = settings_from_env(env)
    celery = create_celery_app(settings)
    worker = start_worker(env, tmp, name=name)
    try:
        with ApiServer(create_app(settings, celery), port) as api:
            yield Stack(settings, env, api, worker, celery, tmp)
    finally:
        worker.stop()
        drop_queues(redis_client(settings.broker_url, settings.sentinel_master), settings)
