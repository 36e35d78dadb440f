"""A service for fault tests: the API over HTTP, workers on the synthetic engine
(cost of an SD1.5 batch on a GPU, optional injected faults) that a test kills and
replaces, and a private Redis that it can stop and restart."""
from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis
import requests

from imagegenx.launcher import redis_answers
from imagegenx.settings import Settings
from tests.integration.stack import API_KEY, settings_from_env, stack_env
from tests.service import ApiServer, Worker, drop_queues, free_port, start_worker

HEADERS = {"X-API-Key": API_KEY}
DONE = ("SUCCESS", "FAILURE", "REVOKED")


class PrivateRedis:
    """A redis-server of its own that keeps its data across a restart (append-only file)."""

    def __init__(self, data_dir: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("this test needs redis-server on the PATH")
        self.binary = binary
        self.dir = data_dir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def base(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def start(self, timeout: float = 10.0) -> None:
        self.proc = subprocess.Popen(
            [self.binary, "--bind", "127.0.0.1", "--port", str(self.port), "--dir", str(self.dir),
             "--save", "", "--appendonly", "yes", "--appendfsync", "always"],
            stdout=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while not redis_answers(self.base + "/0"):
            if time.monotonic() > deadline:
                raise RuntimeError("private redis-server did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        """Stop it the way an operator does (SIGTERM: the append-only file is flushed)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(10)
        self.proc = None


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[str]:
    """A redis-server of the test's own: no other test's worker shares its database
    (kombu keeps unacknowledged messages in one hash per database)."""
    server = PrivateRedis(tmp_path / "redis")
    server.start()
    try:
        yield server.base
    finally:
        server.stop()


@dataclass
class Service:
    env: dict[str, str]
    settings: Settings
    api: ApiServer
    celery: Any
    log_dir: Path
    workers: list[Worker] = field(default_factory=list)

    @property
    def base(self) -> str:
        return self.api.base

    def start_worker(self, name: str) -> Worker:
        worker = start_worker(self.env, self.log_dir, name=name)
        self.workers.append(worker)
        return worker

    def redis(self) -> redis.Redis:
        return redis.Redis.from_url(self.env["IMAGEGENX_BROKER_URL"])

    def submit(self, body: dict[str, Any]) -> str:
        r = requests.post(f"{self.base}/api/v1/images", json=body, headers=HEADERS, timeout=10)
        assert r.status_code == 202, r.text
        return str(r.json()["task_id"])

    def status(self, task_id: str) -> dict[str, Any]:
        r = requests.get(f"{self.base}/api/v1/tasks/{task_id}", headers=HEADERS, timeout=10)
        assert r.status_code == 200, r.text
        return dict(r.json())

    def states(self, ids: list[str]) -> dict[str, str]:
        return {t: self.status(t)["state"] for t in ids}

    def wait_states(self, ids: list[str], wanted: tuple[str, ...] = DONE,
                    timeout: float = 30.0) -> dict[str, dict[str, Any]]:
        """Poll until every task is in one of ``wanted``; returns their bodies."""
        deadline = time.monotonic() + timeout
        bodies: dict[str, dict[str, Any]] = {}
        while True:
            for t in ids:
                if t not in bodies:
                    body = self.status(t)
                    if body["state"] in wanted:
                        bodies[t] = body
            if len(bodies) == len(ids):
                return bodies
            if time.monotonic() > deadline:
                missing = {t: self.status(t)["state"] for t in ids if t not in bodies}
                raise AssertionError(f"not {wanted} after {timeout} s: {missing}")
            time.sleep(0.05)

    def deliveries(self, task_id: str) -> dict[str, int]:
        raw = self.redis().hgetall(f"imagegenx:deliveries:{task_id}")
        return {k.decode(): int(v) for k, v in raw.items()}

    def supervise(self, worker: Worker, ids: list[str], *, name: str, max_exits: int, timeout: float,
                  on_exit: Callable[[Worker], None]) -> tuple[Worker, list[float]]:
        """Replace each worker that exits, as a process supervisor would (the n-th
        replacement is named ``name`` + n), until every task in ``ids`` is SUCCESS or
        FAILURE. ``on_exit`` checks each exited worker. Returns the last worker and
        when each exit was seen (seconds from the call)."""
        started = time.monotonic()
        exits: list[float] = []
        while True:
            if worker.proc.poll() is not None:
                on_exit(worker)
                exits.append(time.monotonic() - started)
                assert len(exits) <= max_exits, f"{len(exits)} workers exited, at most {max_exits} expected"
                worker = self.start_worker(f"{name}{len(exits)}")
            states = self.states(ids)
            if all(s in ("SUCCESS", "FAILURE") for s in states.values()):
                return worker, exits
            assert time.monotonic() - started < timeout, (states, exits)
            time.sleep(0.1)

    def unacked_ids(self) -> set[str]:
        """Task ids of messages the broker holds as delivered but not acknowledged."""
        ids = set()
        for raw in self.redis().hvals("unacked"):
            message = json.loads(raw)[0]
            ids.add(message.get("headers", {}).get("id"))
        return ids


def wait_until(predicate: Any, timeout: float, what: str, interval: float = 0.02) -> float:
    """Poll ``predicate`` until true; returns the monotonic time it became true."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)
    return time.monotonic()


@contextmanager
def fault_service(redis_base: str, tmp: Path, **extra: str) -> Iterator[Service]:
    """The API (no worker yet) on the synthetic engine with the SD1.5-on-H200 cost model.

    ``extra`` are IMAGEGENX_* settings. Workers are started by the test and
    killed at the end.
    """
    from imagegenx.api import create_app
    from tasks import create_celery_app

    port = free_port()
    env = stack_env(redis_base, tmp, None, port, IMAGEGENX_ENGINE="synthetic",
                    IMAGEGENX_SYNTHETIC_COST="sd15-h200", IMAGEGENX_WEBHOOK_BACKOFF_MAX_S="1",
                    **extra)
    settings = settings_from_env(env)
    celery = create_celery_app(settings)
    service: Service | None = None
    try:
        with ApiServer(create_app(settings, celery), port) as api:
            service = Service(env, settings, api, celery, tmp)
            yield service
    finally:
        if service is not None:
            for worker in service.workers:
                worker.stop(signal.SIGKILL, timeout=10)
        try:
            drop_queues(redis.Redis.from_url(env["IMAGEGENX_BROKER_URL"], socket_connect_timeout=1), settings)
        except redis.RedisError:
            pass
