"""Shared pieces of the benchmarks: start the real service processes, collect
results straight from the Redis result backend, summarise latencies."""
from __future__ import annotations

import json
import os
import platform
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import redis
import requests

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def machine() -> dict[str, Any]:
    return {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()}


def now_utc() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"p50": float("nan"), "p95": float("nan"), "p99": float("nan"), "mean": float("nan")}
    arr = np.asarray(values)
    return {"p50": float(np.percentile(arr, 50)), "p95": float(np.percentile(arr, 95)),
            "p99": float(np.percentile(arr, 99)), "mean": float(arr.mean())}


def burst_rate(finishes: list[float], start: float, end: float, gap_s: float = 0.2) -> float:
    """Completions per second in ``[start, end]``, free of the batch-size quantum.

    A worker that finishes whole batches completes images in bursts, so a plain
    count over a window is off by up to a batch (32 images in 16 s is 2 img/s).
    This counts from the end of the first burst in the window to the end of the
    last one (a burst: completions less than ``gap_s`` apart), so the interval
    holds whole periods. Completions that never pause that long are one burst;
    then it is (n - 1) over the span from first to last. A window holding fewer
    than three burst ends (two periods; a ramp-up, or a window shorter than the
    work) gives the plain count over the window, as do fewer than two completions."""
    times = sorted(t for t in finishes if start <= t <= end)
    if len(times) < 2 or times[-1] == times[0]:
        return len(times) / (end - start)
    ends = [a for a, b in zip(times, times[1:]) if b - a >= gap_s] + [times[-1]]
    if len(ends) == 1:
        return (len(times) - 1) / (times[-1] - times[0])
    if len(ends) < 3:
        return len(times) / (end - start)
    first, last = ends[0], ends[-1]
    return sum(1 for t in times if first < t <= last) / (last - first)


def closed_loop_rates(finishes: list[float], start: float, end: float) -> dict[str, float]:
    """A closed loop's images/s over ``[start, end]``: between burst ends
    (:func:`burst_rate`), and the plain count over the window beside it."""
    in_window = sum(1 for t in finishes if start <= t <= end)
    return {"images_per_s": burst_rate(finishes, start, end), "images_per_s_window": in_window / (end - start)}


def measure_requests(base: str, key: str, clients: int, seconds: float,
                     task_path: Callable[[], str], task_status: int = 200,
                     pause_s: float = 0.0, timeout_s: float = 5.0) -> dict[str, Any]:
    """Latencies (ms) of ordinary API requests while something else loads the API.

    ``clients`` threads alternate ``GET /healthz`` (200) and ``GET task_path()``
    (``task_status``) for ``seconds``; a failed or wrong answer counts as an error at
    ``timeout_s``. Percentiles per kind and for all together."""
    results: dict[str, list[float]] = {"healthz": [], "task": []}
    errors: dict[str, int] = {"healthz": 0, "task": 0}
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def client() -> None:
        session = requests.Session()
        i = 0
        while time.monotonic() < deadline:
            name = "healthz" if i % 2 == 0 else "task"
            url, want = (f"{base}/healthz", 200) if name == "healthz" else (base + task_path(), task_status)
            t0 = time.perf_counter()
            try:
                ok = session.get(url, headers={"X-API-Key": key}, timeout=timeout_s).status_code == want
            except requests.RequestException:
                ok = False
            elapsed = (time.perf_counter() - t0) * 1000 if ok else timeout_s * 1000
            with lock:
                results[name].append(elapsed)
                errors[name] += 0 if ok else 1
            i += 1
            if pause_s:
                time.sleep(pause_s)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    every = results["healthz"] + results["task"]
    return {name: {"requests": len(values),
                   "errors": sum(errors.values()) if name == "all" else errors[name],
                   **{k: round(v, 2) for k, v in percentiles(values).items()}}
            for name, values in (*results.items(), ("all", every))}


def wait_log(path: Path, text: str, proc: subprocess.Popen[bytes], timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited:\n{path.read_text(errors='replace')[-3000:]}")
        if path.exists() and text in path.read_text(errors="replace"):
            return
        time.sleep(0.1)
    raise TimeoutError(f"{text!r} not seen in {path}")


@contextmanager
def process(cmd: list[str], env: dict[str, str], log: Path, ready: str | None = None,
            ready_url: str | None = None,
            grace_s: float = 30.0) -> Iterator[subprocess.Popen[bytes]]:
    fh = log.open("wb")
    proc = subprocess.Popen(cmd, env={**os.environ, **env, "PYTHONUNBUFFERED": "1"}, cwd=REPO,
                            stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        if ready:
            wait_log(log, ready, proc)
        if ready_url:
            for _ in range(300):
                try:
                    requests.get(ready_url, timeout=0.5)
                    break
                except requests.RequestException:
                    time.sleep(0.1)
        yield proc
    finally:
        stop_process_group(proc, grace_s)
        fh.close()


def stop_process_group(proc: subprocess.Popen[bytes], grace_s: float = 30.0) -> None:
    """SIGTERM a child started with its own session (warm shutdown), SIGKILL after grace_s."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def celery_worker_cmd(app: str = "tasks", hostname: str = "bench@%h",
                      python: str = sys.executable) -> list[str]:
    return [python, "-m", "celery", "-A", app, "worker", "--loglevel", "INFO", "--hostname",
            hostname, "--without-gossip", "--without-mingle"]


class ResultCollector:
    """Watches Celery result keys in Redis (one MGET per tick) and records when
    each task reached a ready state. Cheaper and more exact than one client
    blocking per task."""

    def __init__(self, url: str, interval: float = 0.002) -> None:
        self.client = redis.Redis.from_url(url)
        self.interval = interval
        self.pending: dict[str, float] = {}
        self.done: dict[str, tuple[float, float, dict[str, Any]]] = {}
        self.lock = threading.Lock()
        self.events: dict[str, threading.Event] = {}
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> "ResultCollector":
        self.thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self.thread.join()

    def watch(self, task_id: str, submitted: float) -> threading.Event:
        ev = threading.Event()
        with self.lock:
            self.pending[task_id] = submitted
            self.events[task_id] = ev
        return ev

    def _run(self) -> None:
        while not self._stop.is_set():
            with self.lock:
                ids = list(self.pending)
            if ids:
                values = self.client.mget([f"celery-task-meta-{i}" for i in ids])
                t = time.perf_counter()
                for task_id, raw in zip(ids, values):
                    if raw is None:
                        continue
                    meta = json.loads(raw)
                    if meta.get("status") in ("SUCCESS", "FAILURE", "REVOKED"):
                        with self.lock:
                            sub = self.pending.pop(task_id)
                            self.done[task_id] = (sub, t, meta)
                            self.events.pop(task_id).set()
            time.sleep(self.interval)
