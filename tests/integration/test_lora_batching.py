"""LoRAs end to end: API -> Redis -> batching worker (tiny model with a LoRA in lora_dir).

Requests with the same LoRA set share a batch; requests with different sets
never do, although they arrive together and would otherwise fit one batch.
"""
from __future__ import annotations

import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
from celery.result import AsyncResult

from tests.integration.lora_files import write_lora
from tests.integration.stack import API_KEY, Stack, running_stack, served_rgb
from tests.service import wait_task

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def stack(redis_base: str, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("lora-e2e")
    write_lora(tiny_model, tmp / "loras" / "style", seed=1)
    # A long flush deadline: the four requests surely arrive before any batch leaves.
    with running_stack(redis_base, tmp, tiny_model, IMAGEGENX_LORA_DIR=str(tmp / "loras"),
                       IMAGEGENX_MAX_WAIT_MS="1500") as s:
        yield s


def pixels(url: str) -> np.ndarray:
    return np.asarray(served_rgb(url), dtype=np.int16)


def test_same_set_shares_a_batch_different_sets_never_do(stack: Stack) -> None:
    common = {"prompt": "a red circle", "width": 64, "height": 64, "steps": 4}
    bodies = [{**common, "seed": 1, "lora": "style"}, {**common, "seed": 1},
              {**common, "seed": 2, "lora": ["style"], "lora_weight": [1.0]}, {**common, "seed": 2}]
    with ThreadPoolExecutor(4) as pool:
        ids = list(pool.map(stack.submit, bodies))
        results = list(pool.map(lambda t: wait_task(stack.base, t, API_KEY, 120), ids))
    assert [r["state"] for r in results] == ["SUCCESS"] * 4, results
    batches = [r["result"]["batch"] for r in results]
    assert batches[0]["id"] == batches[2]["id"] and batches[0]["requests"] == 2  # same set
    assert batches[1]["id"] == batches[3]["id"] and batches[1]["requests"] == 2  # no LoRA
    assert batches[0]["id"] != batches[1]["id"]
    styled, plain = (pixels(results[i]["result"]["images"][0]["url"]) for i in (0, 1))
    assert np.abs(styled - plain).mean() > 2  # same seed and prompt: the LoRA made the difference


def test_unknown_name_is_422_at_the_api(stack: Stack) -> None:
    r = requests.post(f"{stack.base}/api/v1/images", json={"prompt": "x", "lora": "nope"},
                      headers=stack.headers, timeout=10)
    assert r.status_code == 422
    (error,) = r.json()["fields"]
    assert error["field"] == "lora" and "available: style" in error["reason"]


def test_worker_fails_a_request_naming_a_missing_lora(stack: Stack) -> None:
    """A message that did not pass this API (e.g. an API host without the folder)."""
    task_id = str(uuid.uuid4())
    stack.celery.send_task("imagegenx.generate", kwargs={"prompt": "x", "seed": 3, "lora": "gone"},
                           task_id=task_id, queue=stack.settings.queue)
    result = AsyncResult(task_id, app=stack.celery)
    result.get(timeout=60, propagate=False)
    assert result.state == "FAILURE"
    assert "unknown LoRA 'gone'" in str(result.result) and "available: style" in str(result.result)
