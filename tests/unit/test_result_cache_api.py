"""The result cache and the preview field at the API (real Redis, no worker: the
earlier task's SUCCESS and files are written as a worker would)."""
from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient

from imagegenx.api import create_app
from imagegenx.api.cost_limits import CostBudget
from imagegenx.redis_client import redis_client
from imagegenx.settings import Settings
from tests.service import drop_queues

KEY = f"unit-cache-key-{uuid.uuid4().hex}"  # its own cost budget window on every run
BODY: dict[str, Any] = {"prompt": "a red circle", "seed": 11, "width": 64, "height": 64, "steps": 10,
                        "cache": True}


@pytest.fixture(scope="module")
def app_parts(redis_base: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[FlaskClient, Settings]]:
    settings = Settings(broker_url=f"{redis_base}/3", result_backend=f"{redis_base}/3",
                        queue=f"unit-cache-{uuid.uuid4().hex[:8]}", api_keys=[KEY], rate_limit="",
                        storage_root=tmp_path_factory.mktemp("files"), max_request_cost=0,
                        cost_budget_per_minute=0)
    app = create_app(settings)
    yield app.test_client(), settings
    drop_queues(redis_client(settings.broker_url, settings.sentinel_master), settings)


def post(client: FlaskClient, body: dict[str, Any]):  # type: ignore[no-untyped-def]
    return client.post("/api/v1/images", json=body, headers={"X-API-Key": KEY})


@pytest.mark.parametrize("body,field,reason", [
    ({"preview": {"every": 0}}, "preview.every", "must be at least 1"),
    ({"preview": {"every": 1001}}, "preview.every", "must be at most 1000"),
    ({"preview": 3}, "preview", ""),
    ({"cache": "yes"}, "cache", "must be true or false"),
])
def test_bad_preview_or_cache_is_422_naming_the_field(app_parts, body, field, reason) -> None:  # type: ignore[no-untyped-def]
    client, _ = app_parts
    r = post(client, {"prompt": "x", **body})
    assert r.status_code == 422, r.json
    fields = {f["field"]: f["reason"] for f in r.json["fields"]}
    assert field in fields and reason in fields[field], fields


def finish_like_a_worker(client: FlaskClient, settings: Settings, task_id: str) -> None:
    app = client.application
    celery = app.extensions["imagegenx"].celery
    root = Path(settings.storage_root)
    (root / task_id).mkdir(parents=True)
    (root / task_id / "0.png").write_bytes(b"\x89PNG fake")
    (root / task_id / "0.thumb.png").write_bytes(b"\x89PNG thumb")
    url = f"http://127.0.0.1:8000/api/v1/files/{task_id}/0.png"
    celery.backend.store_result(task_id, {
        "schema_version": 1, "images": [{"url": url, "thumbnail_url": url.replace(".png", ".thumb.png"),
                                         "seed": 11, "width": 64, "height": 64}],
        "batch": {"id": "b", "size": 1, "requests": 1}, "timings": {"engine_s": 0.1},
        "model": settings.served_model_name, "sampler": "euler", "steps": 10, "cost": 1}, "SUCCESS")


def cache_count(client: FlaskClient, outcome: str) -> float:
    for line in client.get("/metrics").get_data(as_text=True).splitlines():
        if line.startswith(f'imagegenx_api_result_cache_total{{outcome="{outcome}"}}'):
            return float(line.split()[-1])
    raise AssertionError(outcome)


def test_a_hit_is_success_at_once_and_not_charged(app_parts) -> None:  # type: ignore[no-untyped-def]
    client, settings = app_parts
    first = post(client, BODY)
    assert first.status_code == 202 and first.json["cached"] is False
    cost = first.json["cost"]
    # Not finished yet: no hit, a second run is queued.
    assert post(client, BODY).json["cached"] is False
    second_id = post(client, BODY).json["task_id"]
    finish_like_a_worker(client, settings, second_id)
    # From here the key's budget holds exactly one request's cost: a hit must not use it.
    svc = client.application.extensions["imagegenx"]
    svc.cost_budget = CostBudget(svc.redis, cost)
    hits = cache_count(client, "hit")
    hit = post(client, {**BODY, "priority": 2})
    assert hit.status_code == 202 and hit.json["cached"] is True and hit.json["cost"] == 0
    assert cost > 0
    status = client.get(f"/api/v1/tasks/{hit.json['task_id']}", headers={"X-API-Key": KEY}).json
    assert status["state"] == "SUCCESS" and status["result"]["cached"] is True
    assert second_id in status["result"]["images"][0]["url"]  # this key's own earlier task
    assert cache_count(client, "hit") == hits + 1
    assert post(client, {**BODY, "cache": False}).status_code == 202  # charged: the whole budget
    assert post(client, BODY).json["cached"] is True  # still remembered, still not charged
    assert post(client, {**BODY, "cache": False}).status_code == 429
    # The file gone: drawn again (and charged, so over the budget now).
    (Path(settings.storage_root) / second_id / "0.png").unlink()
    assert post(client, BODY).status_code == 429


def test_a_hit_with_a_webhook_queues_its_completed_delivery(redis_base: str, tmp_path: Path) -> None:
    settings = Settings(broker_url=f"{redis_base}/3", result_backend=f"{redis_base}/3",
                        queue=f"unit-cache-hook-{uuid.uuid4().hex[:8]}", api_keys=[KEY], rate_limit="",
                        storage_root=tmp_path, max_request_cost=0, cost_budget_per_minute=0,
                        webhook_secret="s")
    client = create_app(settings).test_client()
    svc = client.application.extensions["imagegenx"]
    hook = "https://hooks.example.com/done"
    body = {**BODY, "prompt": f"a blue square {uuid.uuid4().hex[:6]}"}  # seed 11, as the stored result
    try:
        earlier = post(client, body)
        finish_like_a_worker(client, settings, earlier.json["task_id"])
        assert svc.redis.llen(settings.webhook_queue_name) == 0
        # Only started and progress asked for: a hit runs nothing, so nothing is sent.
        quiet = post(client, {**body, "callback_url": hook, "callback_events": ["started"]})
        assert quiet.json["cached"] is True and svc.redis.llen(settings.webhook_queue_name) == 0
        hit = post(client, {**body, "callback_url": hook})
        assert hit.status_code == 202 and hit.json["cached"] is True
        (raw,) = svc.redis.lrange(settings.webhook_queue_name, 0, -1)
        message = json.loads(raw)
        assert message["headers"]["task"] == "imagegenx.deliver_webhook"
        _, kwargs, _ = json.loads(base64.b64decode(message["body"]))
        assert kwargs["task_id"] == hit.json["task_id"] and kwargs["url"] == hook
        assert kwargs["payload"]["event"] == "completed" and kwargs["payload"]["state"] == "SUCCESS"
        assert kwargs["payload"]["result"]["cached"] is True
        status = client.get(f"/api/v1/tasks/{hit.json['task_id']}", headers={"X-API-Key": KEY}).json
        assert status["webhook"]["state"] == "queued"
    finally:
        drop_queues(redis_client(settings.broker_url, settings.sentinel_master), settings)
