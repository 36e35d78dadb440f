"""Workers on several hosts: one worker host is cut off the network mid-batch.

Each host is a network namespace of its own on one switch (tests/integration/netns.py):
the API host runs Redis (broker and result backend), a local S3 server and the API
under gunicorn; two worker hosts run one worker each on the synthetic engine. While the
first worker runs a batch and holds more requests, its switch port goes down: its
packets are dropped, as with a pulled cable. Its messages come back after the
visibility timeout, the other worker runs them, and every request ends SUCCESS once,
with its images in the bucket. Then the link comes back: the cut worker rejoins, its
late writes change no stored result, and nothing stays unacknowledged.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import requests

from imagegenx.launcher import api_command
from tests.integration.fault_stack import Service, wait_until
from tests.integration.netns import Lan, lan, netns_unavailable, wait_port
from tests.integration.stack import settings_from_env, stack_env
from tests.service import REPO, Worker, start_worker

_REASON = netns_unavailable()
pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(_REASON is not None, reason=f"multi-host test: {_REASON}"),
              pytest.mark.skipif(shutil.which("redis-server") is None,
                                 reason="multi-host test: needs redis-server on the PATH")]

VISIBILITY_TIMEOUT_S = 4
REDIS_PORT, S3_PORT, API_PORT = 6379, 9000, 8000  # each host has its own ports
BUCKET, PREFIX = "imagegenx-hosts", "images/"
AWS_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1"}
# 100 steps of 4 rows: about 2.6 s per batch (synthetic SD1.5-on-H200 cost).
STEPS, REQUESTS = 100, 16


@pytest.fixture
def net(monkeypatch: pytest.MonkeyPatch) -> Iterator[Lan]:
    with lan(["api", "w1", "w2"]) as network:
        addrs = ",".join(h.addr for h in network.hosts.values())
        monkeypatch.setenv("NO_PROXY", ",".join(filter(None, (os.environ.get("NO_PROXY"), addrs))))
        for name, value in AWS_ENV.items():
            monkeypatch.setenv(name, value)
        yield network


def start_api_host(net: Lan, tmp: Path) -> dict[str, str]:
    """Redis, the S3 server and the API inside the API host; the services' settings."""
    api = net.hosts["api"]
    password = secrets.token_hex(8)
    net.spawn(api, ["redis-server", "--port", str(REDIS_PORT), "--bind", api.addr,
                    "--requirepass", password, "--save", "", "--appendonly", "no"],
              tmp / "redis.log")
    s3 = net.spawn(api, [sys.executable, "-m", "moto.server", "-H", api.addr, "-p", str(S3_PORT)],
                   tmp / "s3.log")
    env = stack_env(f"redis://:{password}@{api.addr}:{REDIS_PORT}", tmp, None, API_PORT,
                    IMAGEGENX_PUBLIC_URL=f"http://{api.addr}:{API_PORT}",
                    IMAGEGENX_API_HOST=api.addr, IMAGEGENX_API_PORT=str(API_PORT),
                    IMAGEGENX_ENGINE="synthetic", IMAGEGENX_SYNTHETIC_COST="sd15-h200",
                    IMAGEGENX_MAX_BATCH="4", IMAGEGENX_MAX_WAIT_MS="100",
                    IMAGEGENX_EXPECTED_BATCH_S="1.2",
                    IMAGEGENX_VISIBILITY_TIMEOUT_S=str(VISIBILITY_TIMEOUT_S),
                    IMAGEGENX_WEBHOOK_BACKOFF_MAX_S="1",
                    IMAGEGENX_STORAGE_BACKEND="s3", IMAGEGENX_S3_BUCKET=BUCKET,
                    IMAGEGENX_S3_PREFIX=PREFIX,
                    IMAGEGENX_S3_ENDPOINT_URL=f"http://{api.addr}:{S3_PORT}",
                    IMAGEGENX_S3_REGION="us-east-1", **AWS_ENV)
    wait_port(api.addr, REDIS_PORT, 30, what="redis-server on the API host")
    wait_port(api.addr, S3_PORT, 60, s3, what="the S3 server on the API host")
    import boto3

    boto3.client("s3", endpoint_url=env["IMAGEGENX_S3_ENDPOINT_URL"],
                 region_name="us-east-1").create_bucket(Bucket=BUCKET)
    gunicorn = net.spawn(api, api_command(settings_from_env(env)), tmp / "api.log",
                         env={**os.environ, **env}, cwd=REPO)
    wait_port(api.addr, API_PORT, 60, gunicorn, what="the API (gunicorn) on the API host")
    return env


def held_by(svc: Service, worker: Worker) -> tuple[list[str], list[str]]:
    """Ids the worker runs and those it holds waiting (``celery inspect``)."""
    inspect = svc.celery.control.inspect([worker.hostname], timeout=2)
    active = (inspect.active() or {}).get(worker.hostname, [])
    reserved = (inspect.reserved() or {}).get(worker.hostname, [])
    return [t["id"] for t in active], [t["id"] for t in reserved]


def raw_result(svc: Service, task_id: str) -> bytes | None:
    value = svc.redis().get(f"celery-task-meta-{task_id}")
    return bytes(value) if value is not None else None


def test_worker_host_cut_off_mid_batch(net: Lan, tmp_path: Path) -> None:
    env = start_api_host(net, tmp_path)
    settings = settings_from_env(env)
    from tasks import create_celery_app

    api = SimpleNamespace(base=f"http://{net.hosts['api'].addr}:{API_PORT}")
    svc = Service(env, settings, api, create_celery_app(settings), tmp_path)  # type: ignore[arg-type]
    w1 = start_worker(env, tmp_path, name="w1", prefix=tuple(net.hosts["w1"].argv([])))
    w2 = start_worker(env, tmp_path, name="w2", prefix=tuple(net.hosts["w2"].argv([])))
    svc.workers += [w1, w2]
    try:
        cut_and_restore(net, svc, w1, w2, tmp_path)
    finally:
        net.restore(net.hosts["w1"])
        for worker in (w1, w2):
            worker.stop(timeout=10)


def cut_and_restore(net: Lan, svc: Service, w1: Worker, w2: Worker, tmp_path: Path) -> None:
    bodies = [{"prompt": f"a harbour {i}", "seed": 900 + i, "steps": STEPS} for i in range(REQUESTS)]
    ids = [svc.submit(b) for b in bodies]

    # Cut w1 while it runs a batch (PROGRESS) and holds more requests.
    held: list[tuple[list[str], list[str]]] = []

    def mid_batch() -> bool:
        held[:] = [held_by(svc, w1)]
        running_now = held[0][0]
        return bool(running_now) and any(svc.status(t)["state"] == "PROGRESS" for t in running_now)

    wait_until(mid_batch, 30, "a running batch on w1", interval=0.1)
    net.cut(net.hosts["w1"])
    running, waiting = held[0]
    cut_at = time.monotonic()
    # What w1 held and had not finished just before its packets stopped: it comes back.
    lost = [t for t in running + waiting if svc.status(t)["state"] != "SUCCESS"]
    assert running and lost, "w1 finished its batch before the cut"

    # Every result, from the moment it appears, must never change.
    seen: dict[str, dict[str, Any]] = {}
    raw: dict[str, bytes | None] = {}
    redelivered_s: float | None = None
    deadline = cut_at + 60
    while len(seen) < len(ids):
        assert time.monotonic() < deadline, f"unfinished: {svc.states([t for t in ids if t not in seen])}"
        if redelivered_s is None and all(svc.deliveries(t).get("received", 0) >= 2
                                         for t in lost):
            redelivered_s = time.monotonic() - cut_at  # all the cut worker's requests are back
        for t in ids:
            body = svc.status(t)
            if t in seen:
                assert body["result"] == seen[t]["result"], f"{t} changed its result"
            elif body["state"] in ("SUCCESS", "FAILURE"):
                seen[t], raw[t] = body, raw_result(svc, t)
        time.sleep(0.1)
    recovered_s = time.monotonic() - cut_at
    assert all(b["state"] == "SUCCESS" for b in seen.values()), \
        {t: b["state"] for t, b in seen.items() if b["state"] != "SUCCESS"}

    # The link comes back: w1 rejoins and its late writes change nothing.
    net.restore(net.hosts["w1"])
    restored_at = time.monotonic()

    def w1_idle() -> bool:
        replies = svc.celery.control.ping([w1.hostname], timeout=1) or []
        if not any(w1.hostname in r for r in replies):
            return False
        running_now, waiting_now = held_by(svc, w1)
        return not running_now and not waiting_now

    wait_until(w1_idle, 90, "w1 back and idle", interval=0.5)
    rejoined_s = time.monotonic() - restored_at
    wait_until(lambda: not set(ids) & svc.unacked_ids(), 30, "no unacknowledged message")
    time.sleep(1.0)
    for body, t in zip(bodies, ids):
        final = svc.status(t)
        assert final["state"] == "SUCCESS" and final["result"] == seen[t]["result"], t
        assert raw_result(svc, t) == raw[t], f"{t}: its stored result was written again"
        (image,) = final["result"]["images"]
        assert image["seed"] == body["seed"]
        got = requests.get(image["url"], timeout=10)  # presigned URL of the API host's S3
        assert got.status_code == 200 and got.content[:8] == b"\x89PNG\r\n\x1a\n", t
    # The cut worker's requests came back: each was delivered again.
    assert all(svc.deliveries(t)["received"] >= 2 for t in lost), {t: svc.deliveries(t) for t in lost}
    redelivered_s = recovered_s if redelivered_s is None else redelivered_s
    assert w1.proc.poll() is None and w2.proc.poll() is None

    # Both hosts serve again.
    after = [svc.submit({"prompt": f"after {i}", "seed": 70 + i, "steps": 20}) for i in range(8)]
    done = svc.wait_states(after, timeout=60)
    assert {b["state"] for b in done.values()} == {"SUCCESS"}

    report = {
        "requests": len(ids), "steps": STEPS, "max_batch": svc.settings.max_batch,
        "visibility_timeout_s": VISIBILITY_TIMEOUT_S,
        "restore_interval_s": svc.celery.conf.broker_transport_options.get("unacked_restore_interval"),
        "held_by_cut_worker": {"running": len(running), "waiting": len(waiting),
                               "unfinished_at_cut": len(lost)},
        "cut_to_redelivered_s": round(redelivered_s, 1),
        "cut_to_all_success_s": round(recovered_s, 1),
        "link_back_to_worker_idle_s": round(rejoined_s, 1),
    }
    (tmp_path / "report.json").write_text(json.dumps(report, indent=2))
    print(f"\nworker host cut mid-batch ({len(running)} running, {len(waiting)} waiting on it): "
          f"its requests delivered again {redelivered_s:.1f} s after the cut, "
          f"all {len(ids)} SUCCESS once {recovered_s:.1f} s after it "
          f"(visibility timeout {VISIBILITY_TIMEOUT_S} s); link back -> worker rejoined and idle "
          f"in {rejoined_s:.1f} s\n{json.dumps(report)}")
