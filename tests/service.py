"""Test harness: real Redis, real ``celery worker`` subprocesses, a real HTTP API."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests
from werkzeug.serving import make_server

from imagegenx.launcher import redis_answers

REPO = Path(__file__).resolve().parents[1]


def drop_queues(client: Any, settings: Any) -> None:
    """Delete the queues of a test's settings with the bindings kombu keeps for each in
    Redis (``_kombu.binding.<queue>``, ``_kombu.binding_permanent.<queue>``): every queue
    declared creates them, and they outlive the queue."""
    names = (settings.queue, *settings.generation_queues.values(), settings.webhook_queue_name)
    client.delete(*names, *(f"_kombu.{kind}.{name}" for kind in ("binding", "binding_permanent")
                            for name in names))


def dies_with_tests() -> tuple[str, ...]:
    """A command prefix for servers and workers the tests start: the child gets SIGTERM when
    the test process dies, even by SIGKILL (a cancelled run), so none outlives the run and
    loads the machine under the next one (``setpriv --pdeathsig``, util-linux). The signal
    follows the thread that started the child, so only children of the main thread get it;
    where setpriv is missing, nothing is added."""
    if threading.current_thread() is not threading.main_thread():
        return ()
    setpriv = shutil.which("setpriv")
    return (setpriv, "--pdeathsig", "TERM") if setpriv else ()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def redis_server() -> Iterator[str]:
    """The machine's Redis on 6379 if it answers, else a private one. Yields a base URL."""
    if redis_answers("redis://127.0.0.1:6379/0"):
        yield "redis://127.0.0.1:6379"
        return
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("tests need Redis: none answers on 6379 and redis-server is missing")
    port = free_port()
    proc = subprocess.Popen([*dies_with_tests(), binary, "--bind", "127.0.0.1", "--port", str(port), "--save", "",
                             "--appendonly", "no"], stdout=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}"
    try:
        for _ in range(100):
            if redis_answers(url + "/0"):
                break
            time.sleep(0.05)
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


@dataclass
class Worker:
    proc: subprocess.Popen[bytes]
    hostname: str
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


def start_worker(env: dict[str, str], log_dir: Path, name: str = "w1",
                 ready_timeout: float = 90.0, prefix: tuple[str, ...] = ()) -> Worker:
    """Start ``celery -A tasks worker`` with no pool/prefetch flags; wait until it is ready.

    ``prefix`` runs it through another command, e.g. ``ip netns exec NS`` for a worker
    on another (namespaced) host."""
    hostname = f"{name}@{socket.gethostname()}"
    log = log_dir / f"worker-{name}-{time.time_ns()}.log"
    full_env = {**os.environ, **env, "PYTHONUNBUFFERED": "1"}
    fh = log.open("wb")
    proc = subprocess.Popen(
        [*dies_with_tests(), *prefix, sys.executable, "-m", "celery", "-A", "tasks", "worker", "--loglevel", "INFO",
         "--hostname", hostname, "--without-gossip", "--without-mingle"],
        env=full_env, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT,
    )
    worker = Worker(proc, hostname, log)
    deadline = time.monotonic() + ready_timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"worker exited ({proc.returncode}):\n{worker.output()}")
        if " ready." in worker.output():
            return worker
        time.sleep(0.1)
    worker.stop(signal.SIGKILL)
    raise RuntimeError(f"worker not ready in {ready_timeout} s:\n{worker.output()}")


class ApiServer:
    """The Flask app served over real HTTP from a thread of the test process."""

    def __init__(self, app: Any, port: int | None = None) -> None:
        self.port = port or free_port()
        self.server = make_server("127.0.0.1", self.port, app, threaded=True)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.base = f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "ApiServer":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()


def wait_task(base: str, task_id: str, key: str, timeout: float = 60.0,
              states: tuple[str, ...] = ("SUCCESS", "FAILURE", "REVOKED")) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    body: dict[str, Any] = {}
    while time.monotonic() < deadline:
        body = requests.get(f"{base}/api/v1/tasks/{task_id}", headers={"X-API-Key": key},
                            timeout=5).json()
        if body.get("state") in states:
            return body
        time.sleep(0.05)
    raise TimeoutError(f"task {task_id} still {body.get('state')} after {timeout} s")
