"""Cost through the whole service: the 202 answer says what the key was charged,
the result (REST and Celery) says what ran, and the limits answer over HTTP."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from celery.result import AsyncResult

from imagegenx.redis_client import redis_client
from imagegenx.settings import hash_api_key
from tests.integration.stack import API_KEY, Stack, running_stack
from tests.service import wait_task

pytestmark = pytest.mark.integration

SMALL = {"prompt": "a small one", "width": 128, "height": 128, "steps": 16, "num_images": 2,
         "seed": 5}  # 128x128 / 512x512 x 16 x 2 x 2 = 4 units
UNSET = {"prompt": "native size", "steps": 2, "seed": 6}  # charged as 1024x1024: 16 units


@pytest.fixture(scope="module")
def stack(redis_base: str, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with running_stack(redis_base, tmp_path_factory.mktemp("cost"), tiny_model,
                       IMAGEGENX_MAX_REQUEST_COST="20",
                       IMAGEGENX_COST_BUDGET_PER_MINUTE="22",
                       IMAGEGENX_GUIDANCE_INTERVAL="0,1") as s:  # 2 rows per step, as priced below
        # The key's budget lives in Redis for a minute: start from a full one.
        rdb = redis_client(s.settings.broker_url, s.settings.sentinel_master)
        spent = rdb.keys(f"*imagegenx-cost*{hash_api_key(API_KEY)}*")
        if spent:
            rdb.delete(*spent)
        yield s


def post(stack: Stack, body: dict) -> requests.Response:
    return requests.post(f"{stack.base}/api/v1/images", json=body, headers=stack.headers, timeout=10)


def cost_units_counted(stack: Stack) -> dict[str, float]:
    text = requests.get(f"{stack.base}/metrics", timeout=10).text
    prefix = 'imagegenx_api_cost_units_total{outcome="'
    return {row[len(prefix):].split('"')[0]: float(row.split()[-1])
            for row in text.splitlines() if row.startswith(prefix)}


def test_results_carry_their_cost_and_the_limits_answer_over_http(stack: Stack) -> None:
    counted = cost_units_counted(stack)
    small = post(stack, SMALL)
    assert small.status_code == 202 and small.json()["cost"] == 4
    unset = post(stack, UNSET)
    assert unset.status_code == 202 and unset.json()["cost"] == 16

    res = wait_task(stack.base, small.json()["task_id"], API_KEY, 120)
    assert res["state"] == "SUCCESS" and res["result"]["cost"] == 4
    # What ran: the tiny model's native 64x64, not the max_size it was charged as.
    res = wait_task(stack.base, unset.json()["task_id"], API_KEY, 120)
    assert res["state"] == "SUCCESS"
    assert (res["result"]["images"][0]["width"], res["result"]["cost"]) == (64, 1)
    # Celery clients get the same field.
    assert AsyncResult(small.json()["task_id"], app=stack.celery).get(timeout=60)["cost"] == 4

    # 20 of 22 units are spent: a third 4-unit request is over the key's budget.
    over = post(stack, SMALL)
    assert over.status_code == 429
    assert 1 <= int(over.headers["Retry-After"]) <= 61
    assert over.json()["cost"] == 4 and over.json()["budget_per_minute"] == 22
    # A request above max_request_cost is 422 naming cost, whatever the budget.
    costly = post(stack, {"prompt": "too much", "steps": 3})  # 24 units
    assert costly.status_code == 422
    assert costly.json()["fields"][0]["field"] == "cost"
    assert "max_request_cost" in costly.json()["fields"][0]["reason"]

    # /metrics counts the units by outcome.
    now = cost_units_counted(stack)
    assert {k: now[k] - counted[k] for k in now} == {"accepted": 20, "over_budget": 4,
                                                    "too_costly": 24}
