"""Prometheus metrics (worker and API), GET /api/v1/workers and Flower, through a real worker."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import redis
import requests
from celery.result import AsyncResult
from prometheus_client.parser import text_string_to_metric_families

from imagegenx.api.workers import WorkersResponse
from tests.integration.stack import API_KEY, Stack, running_stack, settings_from_env, stack_env
from tests.service import REPO, free_port, wait_task

pytestmark = pytest.mark.integration

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture(scope="module")
def stack(redis_base: str, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    port = free_port()
    with running_stack(redis_base, tmp_path_factory.mktemp("monitoring"), tiny_model,
                       name="monitor", IMAGEGENX_MAX_WAIT_MS="200",
                       IMAGEGENX_WORKER_METRICS_PORT=str(port)) as s:
        s.metrics_url = f"http://127.0.0.1:{port}/metrics"  # type: ignore[attr-defined]
        yield s


def parse(text: str) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def scrape(url: str) -> Samples:
    r = requests.get(url, timeout=5)
    assert r.status_code == 200, r.text
    assert r.headers["Content-Type"].startswith("text/plain")
    return parse(r.text)


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def names(samples: Samples) -> set[str]:
    return {name for name, _ in samples}


def submit(stack: Stack, body: dict[str, Any]) -> str:
    r = requests.post(f"{stack.base}/api/v1/images", json=body, headers=stack.headers, timeout=10)
    assert r.status_code == 202, r.text
    return r.json()["task_id"]


def test_worker_metrics_move_with_requests(stack: Stack) -> None:
    url = stack.metrics_url  # type: ignore[attr-defined]
    before = scrape(url)
    (info,) = [dict(labels) for name, labels in before if name == "imagegenx_worker_info"]
    assert info["hostname"] == stack.worker.hostname and info["device"] == "cpu"
    assert info["model"] == stack.settings.served_model_name
    # Three valid requests (4 images) batched together, one invalid message sent
    # past the API, one that expired in the queue.
    bodies = [{"prompt": "a", "seed": 1}, {"prompt": "b", "seed": 2, "num_images": 2},
              {"prompt": "c", "seed": 3}]
    with ThreadPoolExecutor(3) as pool:
        ids = list(pool.map(lambda b: submit(stack, b), bodies))
        results = list(pool.map(lambda t: wait_task(stack.base, t, API_KEY, 60), ids))
    assert [r["state"] for r in results] == ["SUCCESS"] * 3
    invalid = stack.celery.send_task("imagegenx.generate", kwargs={"prompt": "x", "steps": 0},
                                     queue=stack.settings.queue)
    expired = stack.celery.send_task(
        "imagegenx.generate", kwargs={"prompt": "late"}, queue=stack.settings.queue,
        expires=datetime.now(timezone.utc) - timedelta(seconds=5))
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not (invalid.state == "FAILURE" and expired.state == "REVOKED"):
        time.sleep(0.05)
    assert (invalid.state, expired.state) == ("FAILURE", "REVOKED")

    after = scrape(url)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("imagegenx_worker_requests_total", outcome="SUCCESS") == 3
    assert delta("imagegenx_worker_requests_total", outcome="FAILURE") == 1
    assert delta("imagegenx_worker_requests_total", outcome="REVOKED") == 1
    assert delta("imagegenx_worker_images_total") == 4
    batches = {r["result"]["batch"]["id"]: r["result"]["batch"]["size"] for r in results}
    assert delta("imagegenx_worker_batch_images_count") == len(batches)
    assert delta("imagegenx_worker_batch_images_sum") == 4
    assert delta("imagegenx_worker_buffer_wait_seconds_count") == 3
    assert delta("imagegenx_worker_batch_engine_seconds_count") == len(batches)
    assert delta("imagegenx_worker_batch_engine_seconds_sum") > 0
    assert delta("imagegenx_worker_batch_seconds_count") == len(batches)
    assert value(after, "imagegenx_worker_buffered_requests") == 0
    assert value(after, "imagegenx_worker_running_requests") == 0
    # A CPU worker exports no GPU series.
    assert not any(n.startswith("imagegenx_worker_gpu_") for n in names(after))


def test_worker_gauges_show_a_running_batch(stack: Stack) -> None:
    task_id = submit(stack, {"prompt": "slow", "seed": 9, "width": 128, "height": 128, "steps": 25})
    url = stack.metrics_url  # type: ignore[attr-defined]
    deadline = time.monotonic() + 20
    running = 0.0
    while time.monotonic() < deadline and not running:
        running = value(scrape(url), "imagegenx_worker_running_requests")
    assert running == 1
    assert wait_task(stack.base, task_id, API_KEY, 60)["state"] == "SUCCESS"
    assert value(scrape(url), "imagegenx_worker_running_requests") == 0


def test_api_metrics_count_requests_by_endpoint_and_status(stack: Stack) -> None:
    before = scrape(f"{stack.base}/metrics")
    ids = [submit(stack, {"prompt": f"m{i}", "seed": i}) for i in range(2)]
    for task_id in ids:
        wait_task(stack.base, task_id, API_KEY, 60)
    assert requests.post(f"{stack.base}/api/v1/images", json={"prompt": "x"}, timeout=5).status_code == 401
    assert requests.get(f"{stack.base}/api/v1/tasks/{uuid.uuid4()}", headers=stack.headers,
                        timeout=5).status_code == 404
    after = scrape(f"{stack.base}/metrics")

    def delta(**labels: str) -> float:
        return (value(after, "imagegenx_api_requests_total", **labels)
                - value(before, "imagegenx_api_requests_total", **labels))

    assert delta(endpoint="/api/v1/images", method="POST", status="202") == 2
    assert delta(endpoint="/api/v1/images", method="POST", status="401") == 1
    assert delta(endpoint="/api/v1/tasks/<task_id>", method="GET", status="404") == 1
    assert delta(endpoint="/api/v1/tasks/<task_id>", method="GET", status="200") >= 2
    assert delta(endpoint="/metrics", method="GET", status="200") == 1  # the first scrape
    hist = "imagegenx_api_request_duration_seconds_count"
    assert (value(after, hist, endpoint="/api/v1/images", method="POST")
            - value(before, hist, endpoint="/api/v1/images", method="POST")) == 3
    # Task ids never become label values.
    assert not any(str(t) in str(labels) for t in ids for _, labels in after)
    assert value(after, "imagegenx_queue_redis_up") == 1
    assert value(after, "imagegenx_queue_depth", queue=stack.settings.queue) == 0


def test_queue_depth_is_read_from_redis_at_scrape_time(redis_base: str, tmp_path: Path) -> None:
    from imagegenx.api import create_app
    from tasks import create_celery_app

    env = stack_env(redis_base, tmp_path, None, free_port())  # its own queue, no worker
    settings = settings_from_env(env)
    celery = create_celery_app(settings)
    client = create_app(settings, celery).test_client()
    metric = ("imagegenx_queue_depth", frozenset({("queue", settings.queue)}))
    try:
        assert parse(client.get("/metrics").text)[metric] == 0
        for i in range(3):
            celery.send_task("imagegenx.generate", kwargs={"prompt": f"q{i}"}, queue=settings.queue)
        celery.send_task("imagegenx.generate", kwargs={"prompt": "urgent"}, queue=settings.queue,
                         priority=9)  # kept in a list of its own by the Redis transport
        assert parse(client.get("/metrics").text)[metric] == 4
    finally:
        conn = redis.Redis.from_url(settings.broker_url)
        conn.delete(settings.queue, f"{settings.queue}\x06\x169")


def test_workers_endpoint_lists_live_workers(stack: Stack) -> None:
    url = f"{stack.base}/api/v1/workers"
    assert requests.get(url, timeout=5).status_code == 401
    task_id = submit(stack, {"prompt": "for the stats", "seed": 4})
    wait_task(stack.base, task_id, API_KEY, 60)
    r = requests.get(url, headers=stack.headers, timeout=10)
    assert r.status_code == 200, r.text
    body = WorkersResponse.model_validate(r.json())
    (mine,) = [w for w in body.workers if w.hostname == stack.worker.hostname]
    assert mine.device == "cpu" and mine.gpus == []
    assert (mine.buffered_requests, mine.running_requests) == (0, 0)
    assert mine.engine and mine.model == stack.settings.served_model_name
    assert mine.metrics_port == int(stack.metrics_url.rsplit(":", 1)[1].split("/")[0])  # type: ignore[attr-defined]
    assert mine.batching.max_batch == stack.settings.max_batch
    assert mine.batching.batches >= 1 and mine.batching.succeeded >= 1
    assert sum(mine.batching.batch_size_histogram.values()) == mine.batching.batches


def test_a_worker_that_does_not_answer_is_absent(stack: Stack) -> None:
    url = f"{stack.base}/api/v1/workers"
    stack.worker.proc.send_signal(signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        r = requests.get(url, headers=stack.headers, timeout=10)
        elapsed = time.monotonic() - t0
    finally:
        stack.worker.proc.send_signal(signal.SIGCONT)
    assert r.status_code == 200
    assert stack.worker.hostname not in [w["hostname"] for w in r.json()["workers"]]
    assert elapsed < stack.settings.workers_inspect_timeout_s + 2
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        listed = requests.get(url, headers=stack.headers, timeout=10).json()["workers"]
        if stack.worker.hostname in [w["hostname"] for w in listed]:
            return
    pytest.fail("the worker did not come back after SIGCONT")


def test_flower_shows_every_request_with_its_own_state_runtime_and_worker(stack: Stack) -> None:
    port = free_port()
    env = {**os.environ, **stack.env, "PYTHONUNBUFFERED": "1"}
    log = stack.log_dir / f"flower-{port}.log"
    with log.open("wb") as fh:
        flower = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "tasks", "flower", "--address=127.0.0.1",
             f"--port={port}", "--basic-auth=user:pass"],
            cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if requests.get(f"{base}/healthcheck", timeout=1).status_code == 200:
                    break
            except requests.ConnectionError:
                time.sleep(0.2)
        else:
            pytest.fail(f"Flower did not start:\n{log.read_text(errors='replace')}")
        assert requests.get(f"{base}/api/tasks", timeout=5).status_code == 401
        time.sleep(1.0)  # Flower's event receiver connects after the HTTP server
        # Four requests that share a batch, then one alone.
        with ThreadPoolExecutor(4) as pool:
            batched = list(pool.map(lambda i: submit(stack, {"prompt": f"f{i}", "seed": i}), range(4)))
            results = list(pool.map(lambda t: wait_task(stack.base, t, API_KEY, 60), batched))
        assert max(r["result"]["batch"]["size"] for r in results) > 1
        alone = submit(stack, {"prompt": "alone", "seed": 99})
        assert wait_task(stack.base, alone, API_KEY, 60)["result"]["batch"]["size"] == 1
        ids = batched + [alone]
        tasks: dict[str, Any] = {}
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            tasks = requests.get(f"{base}/api/tasks", auth=("user", "pass"), timeout=5).json()
            if all(tasks.get(t, {}).get("state") == "SUCCESS" for t in ids):
                break
            time.sleep(0.3)
        for task_id in ids:
            info = tasks.get(task_id)
            assert info is not None, f"{task_id} not in Flower"
            assert info["name"] == "imagegenx.generate"
            assert info["state"] == "SUCCESS"
            assert info["runtime"] > 0
            assert info["worker"] == stack.worker.hostname
        runtimes = {tasks[t]["runtime"] for t in ids}
        assert len(runtimes) > 1  # each request's own runtime, not one per batch
    finally:
        flower.terminate()
        try:
            flower.wait(10)
        except subprocess.TimeoutExpired:
            flower.kill()
            flower.wait(5)


def test_gunicorn_processes_share_counts_in_multiprocess_mode(stack: Stack, tmp_path: Path) -> None:
    """Two gunicorn processes, one PROMETHEUS_MULTIPROC_DIR: every scrape shows all requests."""
    port = free_port()
    metrics_dir = tmp_path / "prom"
    metrics_dir.mkdir()
    env = {**os.environ, **stack.env, "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}
    log = tmp_path / "gunicorn.log"
    with log.open("wb") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "--worker-class", "gthread", "--workers", "2",
             "--threads", "2", "--bind", f"127.0.0.1:{port}", "imagegenx.api:create_app()"],
            cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        pids: set[str] = set()
        while time.monotonic() < deadline and len(pids) < 2:
            try:
                requests.get(f"{base}/api/v1/openapi.json", timeout=2)
            except requests.ConnectionError:
                time.sleep(0.2)
            pids = {p.name for p in metrics_dir.glob("*.db")}
            pids = {name.rsplit("_", 1)[-1] for name in pids}
        assert len(pids) >= 2, f"expected two API processes:\n{log.read_text(errors='replace')}"
        count = lambda s: value(s, "imagegenx_api_requests_total",  # noqa: E731
                                endpoint="/api/v1/openapi.json", method="GET", status="200")
        start = count(parse(requests.get(f"{base}/metrics", timeout=5).text))
        with ThreadPoolExecutor(4) as pool:
            codes = list(pool.map(lambda _: requests.get(f"{base}/api/v1/openapi.json", timeout=5)
                                  .status_code, range(20)))
        assert codes == [200] * 20
        for _ in range(4):  # whichever process answers, it reports both
            assert count(parse(requests.get(f"{base}/metrics", timeout=5).text)) == start + 20
    finally:
        proc.terminate()
        proc.wait(20)
