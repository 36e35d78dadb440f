"""Two models behind one API, each worker on its own model's queue (real Redis, real
worker processes, HTTP): a request waits for its model's worker, never runs on the
other model's, and its result names the model and version that drew it."""
from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import pytest
import requests

from tests.integration.fault_stack import fault_service, own_redis  # noqa: F401 (fixture)
from tests.service import start_worker

pytestmark = pytest.mark.integration

MODELS = json.dumps({"a": {"engine": "synthetic", "version": "a-2026-12"}, "b": {"engine": "synthetic"}})


def test_each_model_runs_on_its_own_workers(own_redis: str, tmp_path: Path) -> None:
    with fault_service(own_redis, tmp_path, IMAGEGENX_MODELS=MODELS) as svc:
        headers = {"X-API-Key": svc.env["IMAGEGENX_API_KEYS"]}
        svc.workers.append(start_worker({**svc.env, "IMAGEGENX_WORKER_MODEL": "a"}, tmp_path, name="a"))
        for_a = svc.submit({"prompt": "x", "seed": 1, "steps": 2, "model": "a"})
        for_b = svc.submit({"prompt": "x", "seed": 2, "steps": 2, "model": "b"})
        default = svc.submit({"prompt": "x", "seed": 3, "steps": 2})
        done = svc.wait_states([for_a, default], timeout=60)
        assert {(b["result"]["model"], b["result"]["model_version"]) for b in done.values()} == {
            ("a", "a-2026-12")}

        time.sleep(1.0)  # b's request stays queued: no worker of b
        assert svc.status(for_b)["state"] == "PENDING"
        queues = requests.get(f"{svc.base}/api/v1/queue", headers=headers, timeout=30).json()["queues"]
        depth = {q["model"]: q["depth"] for q in queues}
        assert depth == {"a": 0, "b": 1, None: 0}

        svc.workers.append(start_worker({**svc.env, "IMAGEGENX_WORKER_MODEL": "b"}, tmp_path, name="b"))
        body = svc.wait_states([for_b], timeout=60)[for_b]
        assert body["state"] == "SUCCESS"
        assert (body["result"]["model"], body["result"]["model_version"]) == ("b", "synthetic")

        # A message sent past the API to the wrong model's queue fails on the worker.
        task_id = str(uuid.uuid4())
        svc.celery.send_task("imagegenx.generate", task_id=task_id, queue=svc.settings.queue_for("a"),
                             kwargs={"prompt": "x", "seed": 4, "steps": 2, "model": "b"})
        failed = svc.celery.AsyncResult(task_id)
        deadline = time.monotonic() + 60
        while failed.state not in ("SUCCESS", "FAILURE") and time.monotonic() < deadline:
            time.sleep(0.1)
        assert failed.state == "FAILURE"
        assert "this worker serves model 'a', not 'b'" in str(failed.result)

        models = requests.get(f"{svc.base}/api/v1/models", headers=headers, timeout=30).json()["models"]
        assert [(m["name"], [w["hostname"].split("@")[0] for w in m["workers"]], m["versions"])
                for m in models] == [("a", ["a"], ["a-2026-12"]), ("b", ["b"], ["synthetic"])]
