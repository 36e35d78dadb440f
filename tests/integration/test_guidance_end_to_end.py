"""Guidance intervals through HTTP, the queue and a real step-scheduler worker
(synthetic engine): the server's default interval fills unset requests, a request's own
interval and a guidance_scale of 1 change the UNet rows the worker runs, a bad interval
is a 422 naming the field, and the playground offers the field.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import requests

from tests.integration.fault_stack import HEADERS, fault_service

pytestmark = pytest.mark.integration


def test_the_worker_runs_the_rows_of_each_interval(redis_base: str, tmp_path: Path) -> None:
    with fault_service(redis_base, tmp_path, IMAGEGENX_SCHEDULER="step",
                       IMAGEGENX_GUIDANCE_INTERVAL="0,0.4") as svc:
        r = requests.post(f"{svc.base}/api/v1/images", headers=HEADERS, timeout=10,
                          json={"prompt": "x", "guidance_interval": [0.5, 0.2]})
        assert r.status_code == 422
        assert r.json()["fields"] == [{"field": "guidance_interval",
                                       "reason": "must satisfy 0 <= start < end <= 1, got [0.5, 0.2]"}]
        page = requests.get(f"{svc.base}/", timeout=10).text
        assert 'name="guidance_interval"' in page and 'placeholder="0,0.4"' in page

        worker = svc.start_worker("guidance")
        bodies = [
            {"prompt": "a default", "steps": 20, "seed": 1},                      # [0, 0.4]: 28 rows
            {"prompt": "a full", "steps": 20, "seed": 2, "guidance_interval": [0, 1]},  # 40 rows
            {"prompt": "a plain", "steps": 20, "seed": 3, "guidance_scale": 1.0,
             "guidance_interval": [0, 1]},                                            # 20 rows
            {"prompt": "a late", "steps": 10, "seed": 4, "num_images": 2,
             "guidance_interval": [0.5, 1]},                                          # 2 x 15 rows
        ]
        ids = [svc.submit(b) for b in bodies]
        done = svc.wait_states(ids, timeout=60)
        assert {d["state"] for d in done.values()} == {"SUCCESS"}
        stats = (svc.celery.control.inspect([worker.hostname], timeout=2).stats() or {})
        batching = stats[worker.hostname]["batching"]
        assert batching["unet_model_rows"] == 28 + 40 + 20 + 30
        assert batching["unet_rows"] == 20 + 20 + 20 + 20  # image rows: one per image and step
