"""callback_url webhooks through the real worker: signed delivery of the result,
retries with backoff, the delivery record in GET /api/v1/tasks/<id>, and
refusals of addresses the webhook must not reach (checked after resolution).

Receivers are threaded HTTP servers on 127.0.0.1. The first stack allows
127.0.0.1 (as a deployment would allow an internal receiver); the second
allows nothing, as by default.
"""
from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from imagegenx.webhooks import verify_signature
from tests.integration.stack import API_KEY, Stack, running_stack
from tests.service import wait_task
from tests.unit.test_webhooks import Receiver

pytestmark = pytest.mark.integration

SECRET = "integration-webhook-secret"
BACKOFF_S = 0.3


def webhook_env(**extra: str) -> dict[str, str]:
    return {"IMAGEGENX_ENGINE": "synthetic", "IMAGEGENX_WEBHOOK_SECRET": SECRET,
            "IMAGEGENX_WEBHOOK_BACKOFF_S": str(BACKOFF_S), "IMAGEGENX_WEBHOOK_MAX_ATTEMPTS": "3",
            "IMAGEGENX_WEBHOOK_TIMEOUT_S": "3", **extra}


@pytest.fixture(scope="module")
def stack(redis_base: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with running_stack(redis_base, tmp_path_factory.mktemp("webhooks"), None, name="hooks",
                       **webhook_env(IMAGEGENX_WEBHOOK_ALLOW_HOSTS="127.0.0.1")) as s:
        yield s


@pytest.fixture(scope="module")
def strict_stack(redis_base: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with running_stack(redis_base, tmp_path_factory.mktemp("webhooks-strict"), None,
                       name="strict", **webhook_env()) as s:
        yield s


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver([])
    yield r
    r.close()


def submit(stack: Stack, callback_url: str, **body: Any) -> str:
    r = requests.post(f"{stack.base}/api/v1/images", headers=stack.headers, timeout=10,
                      json={"prompt": "a webhook test", "seed": 5, "callback_url": callback_url, **body})
    assert r.status_code == 202, r.text
    return r.json()["task_id"]


def wait_webhook(stack: Stack, task_id: str, states: tuple[str, ...], timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    body: dict = {}
    while time.monotonic() < deadline:
        body = requests.get(f"{stack.base}/api/v1/tasks/{task_id}", headers=stack.headers,
                            timeout=5).json()
        if (body.get("webhook") or {}).get("state") in states:
            return body
        time.sleep(0.05)
    raise TimeoutError(f"webhook of {task_id}: {body.get('webhook')}")


def test_the_worker_consumes_the_webhook_queue(stack: Stack) -> None:
    queues = stack.celery.conf.task_queues
    names = {q.name for q in queues}
    assert names == {stack.settings.queue, stack.settings.webhook_queue_name}
    assert f".> {stack.settings.webhook_queue_name} " in stack.worker.output()


def test_result_is_delivered_signed(stack: Stack, receiver: Receiver) -> None:
    task_id = submit(stack, f"http://127.0.0.1:{receiver.port}/hooks/done?tag=1")
    body = wait_webhook(stack, task_id, ("delivered", "failed", "refused"))
    assert body["state"] == "SUCCESS"
    hook = body["webhook"]
    assert hook["state"] == "delivered" and hook["reason"] is None
    assert [a["status_code"] for a in hook["attempts"]] == [200]
    assert hook["delivered_at"] == hook["attempts"][0]["at"]

    (seen,) = receiver.seen
    assert seen["path"] == "/hooks/done?tag=1"
    h = seen["headers"]
    assert h["Content-Type"] == "application/json"
    assert h["X-ImageGenX-Delivery"] == task_id
    assert abs(int(h["X-ImageGenX-Timestamp"]) - time.time()) < 60
    assert verify_signature(SECRET, seen["body"], h["X-ImageGenX-Timestamp"], h["X-ImageGenX-Signature"])
    assert not verify_signature("wrong", seen["body"], h["X-ImageGenX-Timestamp"], h["X-ImageGenX-Signature"])
    sent = json.loads(seen["body"])
    assert sent["task_id"] == task_id and sent["state"] == "SUCCESS" and sent["error"] is None
    assert sent["result"] == body["result"]  # the same result GET returns
    assert sent["result"]["images"][0]["seed"] == 5


def test_a_failing_receiver_gets_three_attempts_with_backoff(stack: Stack) -> None:
    flaky = Receiver([500, 503, 200])
    try:
        task_id = submit(stack, f"http://127.0.0.1:{flaky.port}/hook")
        hook = wait_webhook(stack, task_id, ("delivered", "failed"))["webhook"]
    finally:
        flaky.close()
    assert hook["state"] == "delivered"
    assert [a["status_code"] for a in hook["attempts"]] == [500, 503, 200]
    assert "receiver answered 500" in hook["attempts"][0]["error"]
    assert len(flaky.seen) == 3
    # Same delivery id every time, a fresh timestamp and valid signature each time.
    assert {s["headers"]["X-ImageGenX-Delivery"] for s in flaky.seen} == {task_id}
    for s in flaky.seen:
        h = s["headers"]
        assert verify_signature(SECRET, s["body"], h["X-ImageGenX-Timestamp"], h["X-ImageGenX-Signature"])
    gaps = [b["at"] - a["at"] for a, b in zip(hook["attempts"], hook["attempts"][1:])]
    assert gaps[0] >= BACKOFF_S * 0.9 and gaps[1] >= 2 * BACKOFF_S * 0.9, gaps


def test_delivery_gives_up_after_max_attempts(stack: Stack) -> None:
    down = Receiver([500] * 10)
    try:
        task_id = submit(stack, f"http://127.0.0.1:{down.port}/hook")
        hook = wait_webhook(stack, task_id, ("delivered", "failed"))["webhook"]
    finally:
        down.close()
    assert hook["state"] == "failed" and "gave up after 3 attempts" in hook["reason"]
    assert [a["status_code"] for a in hook["attempts"]] == [500, 500, 500]
    assert len(down.seen) == 3


def test_a_final_answer_is_not_retried(stack: Stack) -> None:
    gone = Receiver([410])
    try:
        task_id = submit(stack, f"http://127.0.0.1:{gone.port}/hook")
        hook = wait_webhook(stack, task_id, ("delivered", "failed"))["webhook"]
    finally:
        gone.close()
    assert hook["state"] == "failed" and "410 (not retried)" in hook["reason"]
    assert len(gone.seen) == 1


def test_metadata_address_is_refused_by_the_delivery_task(stack: Stack) -> None:
    """Sent straight to the webhook queue (skipping the API's checks): the
    worker vets the address itself, and the allow-list cannot open it."""
    task_id = "11111111-2222-3333-4444-555555555555"
    stack.celery.send_task("imagegenx.deliver_webhook", queue=stack.settings.webhook_queue_name,
                           kwargs={"task_id": task_id, "url": "http://169.254.169.254/latest/meta-data/",
                                   "payload": {"task_id": task_id, "state": "SUCCESS"}})
    from tasks.webhooks import delivery_record

    record = delivery_record(stack.settings)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not record.get(task_id):
        time.sleep(0.05)
    hook = record.get(task_id)
    assert hook is not None and hook["state"] == "refused", hook
    assert "cloud metadata" in hook["reason"] and hook["attempts"] == []
    logged = "webhook of 11111111-2222-3333-4444-555555555555 refused: must not point at a cloud metadata"
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and logged not in stack.worker.output():
        time.sleep(0.05)
    assert logged in stack.worker.output()


def test_a_name_resolving_to_loopback_is_refused_without_the_allow_list(
        strict_stack: Stack, receiver: Receiver) -> None:
    task_id = submit(strict_stack, f"http://localhost:{receiver.port}/hook")
    body = wait_webhook(strict_stack, task_id, ("refused", "delivered", "failed"))
    assert body["state"] == "SUCCESS"  # the image is made; only the webhook is refused
    hook = body["webhook"]
    assert hook["state"] == "refused" and hook["attempts"] == []
    assert "localhost resolves to" in hook["reason"] and "loopback" in hook["reason"]
    time.sleep(0.3)
    assert receiver.seen == []


def test_literal_loopback_is_refused_by_the_api_without_the_allow_list(strict_stack: Stack) -> None:
    r = requests.post(f"{strict_stack.base}/api/v1/images", headers=strict_stack.headers, timeout=10,
                      json={"prompt": "x", "callback_url": "http://127.0.0.1:9/hook"})
    assert r.status_code == 422
    assert r.json()["fields"][0]["field"] == "callback_url"


def test_tasks_without_callback_have_no_webhook_field(stack: Stack) -> None:
    r = requests.post(f"{stack.base}/api/v1/images", headers=stack.headers, timeout=10,
                      json={"prompt": "no callback"})
    done = wait_task(stack.base, r.json()["task_id"], API_KEY, 30)
    assert done["state"] == "SUCCESS" and done["webhook"] is None
