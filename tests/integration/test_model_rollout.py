"""A model update without losing a request, with Celery's own controls
(docs/OPERATIONS.md, "Updating a model"):

1. workers of the new version start on the model's queue next to the old ones;
2. ``celery control cancel_consumer <queue>.<model> -d <old worker>``: the old
   worker takes nothing new;
3. SIGTERM (warm shutdown): it hands its buffered requests back to the queue,
   finishes the batch it runs, stores and acknowledges it, and exits.

The two versions of the model ``art`` are the shipped shapes model (the old one)
and a tiny model of the SD1.5 classes written by the test (the new one): two real
diffusion models on the CPU, each a folder the worker loads. The shapes model
draws a batch of eight 2-step 64x64 requests in seconds on a 2-core CPU, so it is
the old version, which serves only until it is told to stop consuming; the tiny
model, a few times faster, draws the rest. Each request draws one 64x64 image in
2 steps: the rollout, not the pictures, is under test. No timing is asserted;
the timeouts are generous.
The service runs on a Redis of its own: kombu keeps every queue's unacknowledged
messages in one hash per database, which a worker of another test with a short
visibility timeout on the shared database would sweep back into the queues.
The test sends ``cancel_consumer`` from Python (``app.control.cancel_consumer``), the
same broadcast as the documented ``celery -A tasks control cancel_consumer``
command, whose start-up would add tens of seconds here.
"""
from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path

import pytest
import requests

from imagegenx.shapes.model_files import SHAPES_MODEL
from tests.integration.fault_stack import Service, fault_service, own_redis  # noqa: F401 (fixture)
from tests.service import Worker, start_worker

pytestmark = pytest.mark.integration

TOTAL = 200


def models_env(version: str, path: Path) -> str:
    return json.dumps({"art": {"path": str(path), "engine": "diffusion", "version": version}})


def body(i: int) -> dict[str, object]:
    return {"prompt": "a red circle on a blue background", "model": "art", "seed": i,
            "steps": 2, "width": 64, "height": 64}


def cancel_consumer(svc: Service, queue: str, worker: Worker) -> str:
    """``celery -A tasks control cancel_consumer QUEUE -d WORKER``, sent from Python."""
    replies = svc.celery.control.cancel_consumer(queue, destination=[worker.hostname], reply=True,
                                                 timeout=30)
    return str(replies)


def test_rolling_model_update_loses_no_request(own_redis: str, tmp_path: Path, tiny_model: Path) -> None:
    v1 = models_env("shapes-v1", SHAPES_MODEL)
    v2 = models_env("tiny-v2", tiny_model)
    with fault_service(own_redis, tmp_path, IMAGEGENX_MODELS=v1, IMAGEGENX_DEVICE="cpu",
                       IMAGEGENX_MAX_BATCH="8") as svc:
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

        t0 = time.monotonic()
        lap = lambda what: print(f"\n{time.monotonic() - t0:6.1f} s {what}")  # noqa: E731
        submit(50)  # the old version at work
        lap("50 submitted")
        # More arrive while the new version starts (its start takes seconds).
        during_start = threading.Thread(target=submit, args=(50, 0.1))
        during_start.start()
        new = start_worker({**svc.env, "IMAGEGENX_MODELS": v2}, tmp_path, name="new", ready_timeout=180)
        svc.workers.append(new)
        during_start.join()
        lap("new ready")
        submit(25)  # both versions consume now
        phase["cancel"] = len(ids)
        reply = cancel_consumer(svc, queue, old)
        lap("cancelled")
        assert "no longer consuming" in reply, reply

        r = requests.get(f"{svc.base}/api/v1/models", headers={"X-API-Key": svc.env["IMAGEGENX_API_KEYS"]},
                         timeout=30)
        assert r.status_code == 200, r.text
        (art,) = r.json()["models"]
        seen = {w["hostname"]: w for w in art["workers"]}
        assert (seen[old.hostname]["consuming"], seen[old.hostname]["model_version"]) == (False, "shapes-v1")
        assert (seen[new.hostname]["consuming"], seen[new.hostname]["model_version"]) == (True, "tiny-v2")

        submit(25)  # only the new version takes these
        old.proc.send_signal(signal.SIGTERM)  # warm shutdown: finish what it holds
        submit(TOTAL - len(ids), 0.02)
        assert old.proc.wait(120) == 0, old.output()[-3000:]
        lap("old exited")

        done = svc.wait_states(ids, timeout=240)
        lap("all done")
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
