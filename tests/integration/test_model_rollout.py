"""A model update without losing a request, with Celery's own controls
(docs/OPERATIONS.md, "Updating a model"):

1. workers of the new version start on the model's queue next to the old ones;
2. ``celery control cancel_consumer <queue>.<model> -d <old worker>``: the old
   worker takes nothing new;
3. SIGTERM (warm shutdown): it hands its buffered requests back to the queue,
   finishes the batch it runs, stores and acknowledges it, and exits.

The two versions of the model ``art`` are the shipped shapes model (v1) and a tiny
model of the SD1.5 classes written by the test (v2), both real diffusion models
on the CPU. To keep 200 requests well under two minutes on a loaded 2-core
machine, each request draws one 64x64 image in 2 steps: the rollout, not the
pictures, is under test. No timing is asserted; the timeouts are generous.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests

from tests.integration.fault_stack import Service, fault_service
from tests.service import REPO, Worker, start_worker

pytestmark = pytest.mark.integration

SHAPES = REPO / "imagegenx" / "engine" / "assets" / "shapes"
TOTAL = 200


def models_env(path: Path, version: str) -> str:
    return json.dumps({"art": {"path": str(path), "engine": "diffusion", "version": version}})


def body(i: int) -> dict[str, object]:
    return {"prompt": "a red circle on a blue background", "model": "art", "seed": i,
            "steps": 2, "width": 64, "height": 64}


def cancel_consumer(svc: Service, queue: str, worker: Worker) -> str:
    """The operator's command, as documented: ``celery -A tasks control cancel_consumer``."""
    out = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "tasks", "control", "cancel_consumer", queue,
         "-d", worker.hostname, "--timeout", "10"],
        env={**os.environ, **svc.env}, cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout + out.stderr


def test_rolling_model_update_loses_no_request(redis_base: str, tmp_path: Path, tiny_model: Path) -> None:
    v1 = models_env(SHAPES, "shapes-v1")
    v2 = models_env(tiny_model, "tiny-v2")
    with fault_service(redis_base, tmp_path, IMAGEGENX_MODELS=v1, IMAGEGENX_DEVICE="cpu", IMAGEGENX_MAX_BATCH="8") as svc:
        queue = svc.settings.queue_for("art")
        assert queue == f"{svc.settings.queue}.art"
        old = start_worker({**svc.env, "IMAGEGENX_MODELS": v1}, tmp_path, name="old", ready_timeout=180)
        svc.workers.append(old)
        ids: list[str] = []
        phase: dict[str, int] = {}

        def submit(n: int, pause: float = 0.0) -> None:
            for _ in range(n):
                ids.append(svc.submit(body(len(ids))))
                time.sleep(pause)

        submit(50)  # the old version at work
        # More arrive while the new version starts (its start takes seconds).
        during_start = threading.Thread(target=submit, args=(50, 0.1))
        during_start.start()
        new = start_worker({**svc.env, "IMAGEGENX_MODELS": v2}, tmp_path, name="new", ready_timeout=180)
        svc.workers.append(new)
        during_start.join()
        submit(25)  # both versions consume now
        phase["cancel"] = len(ids)
        reply = cancel_consumer(svc, queue, old)
        assert "no longer consuming" in reply, reply

        r = requests.get(f"{svc.base}/api/v1/models", headers={"X-API-Key": svc.env["IMAGEGENX_API_KEYS"]},
                         timeout=30)
        assert r.status_code == 200, r.text
        (art,) = r.json()["models"]
        seen = {w["hostname"]: w for w in art["workers"]}
        assert seen[old.hostname]["consuming"] is False and seen[old.hostname]["model_version"] == "shapes-v1"
        assert seen[new.hostname]["consuming"] is True and seen[new.hostname]["model_version"] == "tiny-v2"

        submit(25)  # only the new version takes these
        old.proc.send_signal(signal.SIGTERM)  # warm shutdown: finish what it holds
        submit(TOTAL - len(ids), 0.02)
        assert old.proc.wait(120) == 0, old.output()[-3000:]

        done = svc.wait_states(ids, timeout=240)
        states = {b["state"] for b in done.values()}
        assert states == {"SUCCESS"}, {t: b["state"] for t, b in done.items() if b["state"] != "SUCCESS"}
        results = [done[t]["result"] for t in ids]
        assert {res["model"] for res in results} == {"art"}
        versions = [res["model_version"] for res in results]
        assert set(versions) == {"shapes-v1", "tiny-v2"}, versions
        # Nothing sent after cancel_consumer went to the old version.
        assert set(versions[phase["cancel"]:]) == {"tiny-v2"}
        # Each ran once; nothing is left unacknowledged.
        assert not set(ids) & svc.unacked_ids()
        assert all(svc.deliveries(t).get("started") == 1 for t in ids)
        print(f"\n{TOTAL} requests over the switch: {versions.count('shapes-v1')} drawn by shapes-v1, "
              f"{versions.count('tiny-v2')} by tiny-v2")
