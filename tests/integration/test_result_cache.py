"""Result cache through HTTP: API -> Redis -> worker (tiny real model) -> cached answer."""
from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.integration.stack import API_KEY, Stack, running_stack
from tests.service import wait_task

pytestmark = pytest.mark.integration

OTHER_KEY = "other-key-0123456789"


@pytest.fixture(scope="module")
def stack(redis_base: str, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    # A worker name of its own: the broadcast inspect must reach this worker only.
    with running_stack(redis_base, tmp_path_factory.mktemp("cache"), tiny_model,
                       name=f"cache-{uuid.uuid4().hex[:8]}",
                       IMAGEGENX_API_KEYS=f"{API_KEY},{OTHER_KEY}") as s:
        yield s


def post(stack: Stack, body: dict[str, Any], key: str = API_KEY) -> dict[str, Any]:
    r = requests.post(f"{stack.base}/api/v1/images", json=body, headers={"X-API-Key": key}, timeout=10)
    assert r.status_code == 202, r.text
    return r.json()


def done(stack: Stack, submitted: dict[str, Any], key: str = API_KEY) -> dict[str, Any]:
    body = wait_task(stack.base, submitted["task_id"], key, 120)
    assert body["state"] == "SUCCESS", body
    return body["result"]


def worker_succeeded(stack: Stack) -> int:
    host = stack.worker.hostname
    stats = stack.celery.control.inspect([host], timeout=3).stats()
    return int(stats[host]["batching"]["succeeded"])


def cache_metric(stack: Stack, outcome: str) -> float:
    text = requests.get(f"{stack.base}/metrics", timeout=10).text
    for line in text.splitlines():
        if line.startswith(f'imagegenx_api_result_cache_total{{outcome="{outcome}"}}'):
            return float(line.split()[-1])
    raise AssertionError(f"no result cache metric for {outcome} in /metrics")


def png_bytes(url: str) -> bytes:
    r = requests.get(url, timeout=10)
    assert r.status_code == 200
    return r.content


def test_identical_seeded_request_is_answered_from_the_stored_images(stack: Stack) -> None:
    body = {"prompt": "a green triangle", "seed": 1234, "width": 64, "height": 64, "steps": 4,
            "cache": True}
    hits0, misses0 = cache_metric(stack, "hit"), cache_metric(stack, "miss")
    ran0 = worker_succeeded(stack)
    first = post(stack, body)
    assert first["cached"] is False
    drawn = done(stack, first)
    assert drawn["cached"] is False
    assert worker_succeeded(stack) == ran0 + 1

    # Same pixels, other spelling and fields that do not change pixels: a hit.
    again = post(stack, {**body, "priority": 3, "steps": 4, "sampler": "euler", "timeout_s": 60})
    assert again["cached"] is True and again["cost"] == 0
    assert again["task_id"] != first["task_id"]
    status = requests.get(again["status_url"], headers=stack.headers, timeout=10).json()
    assert status["state"] == "SUCCESS"  # at once: nothing was queued
    cached = status["result"]
    assert cached["cached"] is True
    assert png_bytes(cached["images"][0]["url"]) == png_bytes(drawn["images"][0]["url"])
    assert cache_metric(stack, "hit") == hits0 + 1
    assert cache_metric(stack, "miss") == misses0 + 1
    assert worker_succeeded(stack) == ran0 + 1  # the worker drew only the first

    # Another key does not share this key's cache (nor learn its task id).
    other = post(stack, body, OTHER_KEY)
    assert other["cached"] is False
    assert first["task_id"] not in str(done(stack, other, OTHER_KEY))

    # cache: false, or no seed: the worker draws again.
    ran1 = worker_succeeded(stack)
    off = post(stack, {**body, "cache": False})
    assert off["cached"] is False
    assert done(stack, off)["cached"] is False
    unseeded = {k: v for k, v in body.items() if k != "seed"}
    assert post(stack, unseeded)["cached"] is False
    assert post(stack, unseeded)["cached"] is False
    changed = post(stack, {**body, "steps": 5})
    assert changed["cached"] is False
    done(stack, changed)
    assert worker_succeeded(stack) >= ran1 + 2


def test_a_result_whose_files_are_gone_is_drawn_again(stack: Stack) -> None:
    body = {"prompt": "a yellow square", "seed": 99, "width": 64, "height": 64, "steps": 3, "cache": True}
    first = post(stack, body)
    drawn = done(stack, first)
    (Path(stack.env["IMAGEGENX_STORAGE_ROOT"]) / first["task_id"] / "0.thumb.png").unlink()
    again = post(stack, body)
    assert again["cached"] is False
    assert done(stack, again)["images"][0]["seed"] == drawn["images"][0]["seed"]
    assert post(stack, body)["cached"] is True  # the new run is remembered
