"""Benchmark: our batching worker against two Celery peers, under open-loop load.

Why: batching is the reason this worker exists. A GPU step over n images costs
a fixed part plus a small per-image part, so serving one image per task wastes
most of the card, and the batching policy decides how much of that waste is
recovered. This benchmark serves the same "generate" work three ways and
measures latency and throughput as the offered load rises:

1. ``plain``   - a normal Celery task, one image per message
   (``bench.peers.plain_app``: prefork, concurrency 1, prefetch 1, late acks);
2. ``batches`` - celery-batches (``bench.peers.batches_app``: flush_every = N,
   flush_interval = 50 ms, threads pool of 1, prefetch 2 x N, late acks);
   it needs Celery < 5.7, so it runs from its own virtualenv, created here on
   first use under ``bench/.venvs/batches``;
3. ``ours``    - ``celery -A tasks worker`` (max batch N, max wait 50 ms).

All three run the SYNTHETIC engine with the "sd15-h200" cost model: it sleeps
as long as the measured GPU curve says a batch takes (20 x (13 + 3.3 n) ms plus
13 ms x n to decode) and draws a cheap picture. The figures therefore show
what each *serving strategy* makes of that cost curve on this machine, not
what a real model does; they are labelled synthetic wherever they appear.
Ours does more per request than the peers (validation, per-request state
updates, task events, two PNG files written per image); the peers only run
the engine and store a small result.

Load: Poisson arrivals (exponential gaps from a seeded RNG, scaled so that
exactly load x duration requests arrive; every system gets the same schedule
for a given load), sent with ``send_task`` from this
process, open loop: a slow system does not slow the arrivals down. Completion
time is when the request's SUCCESS result reaches Redis, seen through the
result backend's publish on the result key (with an MGET sweep as a safety
net). Latency = completion - submit. Achieved images/s = completed /
(last completion - first submit). Mean batch = images / distinct batches
(per batch, as the worker ran them), read from each result's batch id.

A point is "saturated" when the backlog (submitted - completed) keeps growing
over the second half of the arrival window (slope above 10 % of the offered
load), or when not everything completed before the drain deadline. A system
is not offered higher loads once its p99 exceeds ``--stop-p99`` (30 s).

Each system gets its own Redis database, flushed before every point, and a
fresh worker process per point; one system runs at a time.

Run: ``python -m bench.batching_peers`` (``--quick`` for a 5 s smoke test).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import redis
from celery import Celery

from bench.harness import stop_process_group
from imagegenx.engine.synthetic import COST_MODELS

REPO = Path(__file__).resolve().parents[1]
ENGINE_LABEL = "synthetic engine (sd15-h200 cost model)"
COST_MODEL = "sd15-h200"
STEPS = 20
RESULT_PREFIX = "celery-task-meta-"
READY_STATES = ("SUCCESS", "FAILURE", "REVOKED")
BATCHES_REQUIREMENTS = ["celery[redis]<5.7", "celery-batches==0.11", "numpy", "pillow"]
ALL_SYSTEMS = ("plain", "batches", "ours")


# -- systems under test -------------------------------------------------------
@dataclass
class System:
    """How to start one system's worker and what to send it."""

    name: str
    description: str
    task_name: str
    queue: str
    redis_url: str
    command: list[str]
    env: dict[str, str]
    settings: dict[str, Any]


def ensure_batches_venv(venv: Path) -> Path:
    """The celery-batches virtualenv's python, creating/completing it if needed."""
    python = venv / "bin" / "python"
    if not python.exists():
        print(f"creating virtualenv {venv} for celery-batches", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    probe = subprocess.run([str(python), "-c", "import celery_batches, numpy, PIL, redis"],
                           capture_output=True)
    if probe.returncode != 0:
        print(f"installing {' '.join(BATCHES_REQUIREMENTS)} into {venv}", file=sys.stderr)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *BATCHES_REQUIREMENTS],
                       check=True)
    return python


def celery_worker_cmd(python: str, app: str, hostname: str) -> list[str]:
    return [python, "-m", "celery", "-A", app, "worker", "--loglevel", "INFO",
            "--hostname", hostname, "--without-gossip", "--without-mingle", "--without-heartbeat"]


def build_systems(names: list[str], redis_base: str, db_base: int, max_batch: int,
                  max_wait_ms: float, storage: Path, venv: Path) -> list[System]:
    cost = COST_MODELS[COST_MODEL]
    full_batch_s = cost.batch_s(max_batch, STEPS)
    host = socket.gethostname()
    tag = os.getpid()
    systems: list[System] = []
    for i, name in enumerate(ALL_SYSTEMS):
        if name not in names:
            continue
        url = f"{redis_base.rstrip('/')}/{db_base + i}"
        queue = f"bench-peers-{name}"
        peer_env = {"PEER_REDIS_URL": url, "PEER_QUEUE": queue, "PEER_MAX_BATCH": str(max_batch),
                    "PEER_FLUSH_INTERVAL_S": str(max_wait_ms / 1000.0),
                    "PEER_COST_MODEL": COST_MODEL, "PYTHONPATH": str(REPO)}
        hostname = f"bench-{name}-{tag}@{host}"
        if name == "plain":
            systems.append(System(
                name, "plain Celery task, one image per message", "bench.plain.generate", queue,
                url, celery_worker_cmd(sys.executable, "bench.peers.plain_app", hostname), peer_env,
                {"pool": "prefork", "concurrency": 1, "prefetch": 1, "acks_late": True,
                 "batch": 1}))
        elif name == "batches":
            python = ensure_batches_venv(venv)
            version = subprocess.run(
                [str(python), "-c", "import celery, importlib.metadata as m; "
                 "print(celery.__version__, m.version('celery-batches'))"],
                capture_output=True, text=True, check=True).stdout.split()
            systems.append(System(
                name, "celery-batches Batches task", "bench.batches.generate", queue, url,
                celery_worker_cmd(str(python), "bench.peers.batches_app", hostname), peer_env,
                {"pool": "threads", "concurrency": 1, "prefetch": 2 * max_batch,
                 "acks_late": True, "flush_every": max_batch,
                 "flush_interval_s": max_wait_ms / 1000.0, "celery": version[0],
                 "celery_batches": version[1], "venv": str(venv)}))
        else:
            env = {
                "IMAGEGENX_ENGINE": "synthetic", "IMAGEGENX_SYNTHETIC_COST": COST_MODEL,
                "IMAGEGENX_MAX_BATCH": str(max_batch), "IMAGEGENX_MAX_WAIT_MS": str(max_wait_ms),
                "IMAGEGENX_MAX_NUM_IMAGES": str(min(4, max_batch)), "IMAGEGENX_QUEUE": queue,
                "IMAGEGENX_BROKER_URL": url, "IMAGEGENX_RESULT_BACKEND": url,
                "IMAGEGENX_STORAGE_ROOT": str(storage / "images"),
                "IMAGEGENX_EXPECTED_BATCH_S": f"{max(1.0, 2 * full_batch_s):.1f}",
            }
            systems.append(System(
                name, "imagegenx batching worker", "imagegenx.generate", queue, url,
                celery_worker_cmd(sys.executable, "tasks", hostname), env,
                {"pool": "threads (batch thread)", "concurrency": 1, "prefetch": 2 * max_batch,
                 "acks_late": True, "max_batch": max_batch, "max_wait_ms": max_wait_ms}))
    return systems


@contextmanager
def worker_process(system: System, log: Path, ready_timeout: float = 120.0) -> Iterator[None]:
    """Start the system's worker in its own session; stop it (warm, then hard) on exit."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("IMAGEGENX_", "PEER_"))}
    env.update(system.env)
    env["PYTHONUNBUFFERED"] = "1"
    with log.open("wb") as fh:
        proc = subprocess.Popen(system.command, env=env, cwd=REPO, stdout=fh,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + ready_timeout
            while " ready." not in log.read_text(errors="replace"):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{system.name} worker did not start:\n{tail(log)}")
                time.sleep(0.1)
            yield
        finally:
            stop_process_group(proc)


def tail(path: Path, chars: int = 3000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else ""


# -- load and measurement -----------------------------------------------------
def poisson_schedule(rate: float, duration: float, seed: int) -> list[float]:
    """Arrival offsets (s): a Poisson process of ``rate``/s over ``duration`` s,
    conditioned on exactly round(rate x duration) arrivals.

    n + 1 exponential gaps, scaled so that they fill the window, are the
    arrival times of a Poisson process given that n arrivals fell in it. A
    free-running count would drift by +-sqrt(n) (at 10/s over 20 s, +-7 %
    one sigma), so the load actually offered would differ from the label,
    and between loads, by more than the effects being measured.
    """
    n = max(1, round(rate * duration))
    rng = np.random.default_rng(seed)
    gaps = rng.exponential(1.0, n + 1)
    times = np.cumsum(gaps)[:n] / gaps.sum() * duration
    return [float(t) for t in times]


@dataclass
class Completion:
    at: float
    status: str
    batch_id: str | None
    batch_size: int | None


class ResultWatcher:
    """Records when each expected task's ready result is written to Redis.

    The Redis result backend publishes every stored state on a channel named
    after the result key; one pattern subscription hears them all as they
    happen, instead of one blocked client per task or a tight polling loop.
    """

    def __init__(self, url: str) -> None:
        self.client = redis.Redis.from_url(url)
        self._pubsub = self.client.pubsub()
        self._pubsub.psubscribe(RESULT_PREFIX + "*")
        while True:  # wait for the subscription to be in force
            msg = self._pubsub.get_message(timeout=5.0)
            if msg is None:
                raise RuntimeError("no psubscribe confirmation from Redis")
            if msg["type"] == "psubscribe":
                break
        self._lock = threading.Lock()
        self._expected: set[str] = set()
        self.done: dict[str, Completion] = {}
        self.found_by_sweep = 0
        self._stop = threading.Event()
        self._events: dict[str, threading.Event] = {}
        self._thread = threading.Thread(target=self._listen, name="result-watcher", daemon=True)
        self._thread.start()

    def expect(self, task_id: str) -> threading.Event:
        ev = threading.Event()
        with self._lock:
            self._expected.add(task_id)
            self._events[task_id] = ev
        return ev

    def pending(self) -> list[str]:
        with self._lock:
            return [t for t in self._expected if t not in self.done]

    def _record(self, task_id: str, at: float, raw: bytes | str) -> bool:
        try:
            meta = json.loads(raw)
        except ValueError:
            return False
        status = meta.get("status")
        if status not in READY_STATES:
            return False
        result = meta.get("result")
        batch = result.get("batch") if isinstance(result, dict) else None
        with self._lock:
            if task_id not in self._expected or task_id in self.done:
                return False
            self.done[task_id] = Completion(
                at, status, batch.get("id") if isinstance(batch, dict) else None,
                batch.get("size") if isinstance(batch, dict) else None)
            ev = self._events.pop(task_id, None)
        if ev is not None:
            ev.set()
        return True

    def _listen(self) -> None:
        while not self._stop.is_set():
            msg = self._pubsub.get_message(timeout=0.2)
            if msg is None or msg["type"] != "pmessage":
                continue
            at = time.monotonic()
            channel = msg["channel"].decode()
            self._record(channel[len(RESULT_PREFIX):], at, msg["data"])

    def sweep(self) -> None:
        """Read the result keys still missing (a safety net for a missed publish)."""
        ids = self.pending()
        if not ids:
            return
        values = self.client.mget([RESULT_PREFIX + t for t in ids])
        at = time.monotonic()
        for task_id, raw in zip(ids, values):
            if raw is not None and self._record(task_id, at, raw):
                self.found_by_sweep += 1

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2.0)
        self._pubsub.close()
        self.client.close()


def nearest_rank(values: list[float], q: float) -> float:
    """q-th percentile by nearest rank; unfinished requests count as +inf."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100.0 * len(ordered)) - 1)]


def backlog_slope(submits: list[float], completes: list[float], start: float, end: float,
                  step: float = 0.25) -> float:
    """Least-squares slope (requests/s) of submitted - completed over [start, end]."""
    s = np.sort(np.asarray(submits))
    c = np.sort(np.asarray(completes))
    grid = np.arange(start, end + 1e-9, step)
    if len(grid) < 3:
        return 0.0
    backlog = np.searchsorted(s, grid, side="right") - np.searchsorted(c, grid, side="right")
    return float(np.polyfit(grid, backlog, 1)[0])


@dataclass
class Point:
    """One (system, offered load) measurement. Times in seconds."""

    system: str
    offered_img_s: float
    duration_s: float
    submitted: int
    completed: int
    failed: int
    achieved_img_s: float
    p50_s: float
    p90_s: float
    p99_s: float
    max_s: float
    mean_s: float
    mean_batch: float | None
    mean_batch_per_request: float | None
    batch_histogram: dict[str, int]
    batches: int
    backlog_at_end_of_arrivals: int
    backlog_slope_req_s: float
    completed_during_arrivals_img_s: float
    drain_s: float
    saturated: bool
    drained: bool
    found_by_sweep: int
    send_lag_p99_ms: float
    requests: list[list[float | int | None]] = field(default_factory=list)


def make_client(system: System) -> Celery:
    client = Celery(f"bench-client-{system.name}", broker=system.redis_url,
                    set_as_current=False)
    client.conf.update(task_serializer="json", accept_content=["json"],
                       broker_connection_retry_on_startup=True)
    return client


def request_body(i: int) -> dict[str, Any]:
    return {"prompt": f"a lighthouse at dusk, variation {i}", "seed": i, "steps": STEPS}


def run_point(system: System, rate: float, duration: float, seed: int, drain_timeout: float,
              logs: Path, log: Callable[[str], None]) -> Point:
    """Flush the system's DB, start a fresh worker, play the schedule, wait, measure."""
    redis.Redis.from_url(system.redis_url).flushdb()
    schedule = poisson_schedule(rate, duration, seed)
    worker_log = logs / f"{system.name}-{rate:g}.log"
    with worker_process(system, worker_log):
        client = make_client(system)
        watcher = ResultWatcher(system.redis_url)
        try:
            # One request end to end before the clock starts: proves the worker
            # consumes, and opens the producer's connection.
            warm_id = f"warmup-{uuid.uuid4().hex}"
            ev = watcher.expect(warm_id)
            client.send_task(system.task_name, kwargs=request_body(10**6), queue=system.queue,
                             task_id=warm_id)
            if not ev.wait(60.0):
                raise RuntimeError(f"{system.name}: warm-up request not answered:\n"
                                   f"{tail(worker_log)}")
            ids = [f"{system.name}-{rate:g}-{i}-{uuid.uuid4().hex[:12]}"
                   for i in range(len(schedule))]
            submits: list[float] = []
            lags: list[float] = []
            t0 = time.monotonic()
            for i, (offset, task_id) in enumerate(zip(schedule, ids)):
                delay = t0 + offset - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                watcher.expect(task_id)
                now = time.monotonic()
                lags.append(now - (t0 + offset))
                submits.append(now)
                client.send_task(system.task_name, kwargs=request_body(i), queue=system.queue,
                                 task_id=task_id)
            arrivals_end = t0 + duration
            while time.monotonic() < arrivals_end:
                time.sleep(0.05)
            deadline = arrivals_end + drain_timeout
            last_sweep = time.monotonic()
            while watcher.pending() and time.monotonic() < deadline:
                time.sleep(0.05)
                if time.monotonic() - last_sweep > 1.0:
                    watcher.sweep()
                    last_sweep = time.monotonic()
            watcher.sweep()
            drain_end = time.monotonic()
        finally:
            watcher.close()
            client.close()

    done = {t: watcher.done[t] for t in ids if t in watcher.done}
    ok = {t: c for t, c in done.items() if c.status == "SUCCESS"}
    latencies = [ok[t].at - s if t in ok else math.inf for t, s in zip(ids, submits)]
    finite = [x for x in latencies if math.isfinite(x)]
    completes = [c.at for c in ok.values()]
    first_submit = submits[0] if submits else t0
    span = (max(completes) - first_submit) if completes else math.nan
    sizes: dict[str, int] = {}
    for c in ok.values():
        if c.batch_id is not None and c.batch_size is not None:
            sizes[c.batch_id] = c.batch_size
    histogram: dict[int, int] = {}
    for n in sizes.values():
        histogram[n] = histogram.get(n, 0) + 1
    per_request = [c.batch_size for c in ok.values() if c.batch_size is not None]
    end_backlog = sum(1 for s in submits if s <= arrivals_end) - sum(
        1 for c in completes if c <= arrivals_end)
    slope = backlog_slope(submits, completes, t0 + duration / 2, arrivals_end)
    drained = len(ok) == len(ids)
    p99 = nearest_rank(latencies, 99)
    point = Point(
        system=system.name, offered_img_s=rate, duration_s=duration, submitted=len(ids),
        completed=len(ok), failed=sum(1 for c in done.values() if c.status != "SUCCESS"),
        achieved_img_s=len(ok) / span if completes and span > 0 else 0.0,
        p50_s=nearest_rank(latencies, 50), p90_s=nearest_rank(latencies, 90), p99_s=p99,
        max_s=max(latencies) if latencies else math.nan,
        mean_s=float(np.mean(finite)) if finite else math.nan,
        mean_batch=(sum(sizes.values()) / len(sizes)) if sizes else None,
        mean_batch_per_request=float(np.mean(per_request)) if per_request else None,
        batch_histogram={str(k): v for k, v in sorted(histogram.items())}, batches=len(sizes),
        backlog_at_end_of_arrivals=end_backlog, backlog_slope_req_s=slope,
        completed_during_arrivals_img_s=sum(1 for c in completes if c <= arrivals_end)
        / duration,
        drain_s=drain_end - arrivals_end, saturated=(slope > 0.1 * rate) or not drained,
        drained=drained, found_by_sweep=watcher.found_by_sweep,
        send_lag_p99_ms=1000.0 * nearest_rank(lags, 99) if lags else 0.0,
        requests=[[round(s - t0, 4), round(lat, 4) if math.isfinite(lat) else None,
                   ok[t].batch_size if t in ok else None]
                  for t, s, lat in zip(ids, submits, latencies)],
    )
    log(f"{system.name:8s} offered {rate:5.1f}/s: {point.completed}/{point.submitted} done, "
        f"{point.achieved_img_s:5.2f} img/s, p50 {point.p50_s:6.2f} s, p99 {point.p99_s:6.2f} s, "
        f"mean batch {fmt_batch(point.mean_batch)}, backlog slope {slope:+.2f}/s"
        f"{' SATURATED' if point.saturated else ''}")
    return point


# -- report -------------------------------------------------------------------
def fmt_batch(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"


def fmt_s(x: float) -> str:
    if math.isnan(x):
        return "-"
    return "never" if math.isinf(x) else f"{x:.2f}"


def table(points: list[Point], header: str) -> str:
    lines = [header, ""]
    row = "{:<8} {:>8} {:>9} {:>8} {:>8} {:>11}  {}"
    lines.append(row.format("system", "offered", "achieved", "p50 s", "p99 s", "mean batch",
                            "note"))
    lines.append(row.format("", "img/s", "img/s", "", "", "", ""))
    for p in points:
        note = []
        if p.saturated:
            note.append("saturated")
        if not p.drained:
            note.append(f"{p.submitted - p.completed} not done by drain deadline")
        lines.append(row.format(p.system, f"{p.offered_img_s:g}", f"{p.achieved_img_s:.2f}",
                                fmt_s(p.p50_s), fmt_s(p.p99_s), fmt_batch(p.mean_batch),
                                ", ".join(note)))
    return "\n".join(lines)


def jsonable(x: Any) -> Any:
    """JSON has no inf/nan: write them as null."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    return x


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.batching_peers", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--loads", default="2,4,6,8,10,12", help="offered loads, images/s")
    ap.add_argument("--duration", type=float, default=20.0, help="seconds of arrivals per point")
    ap.add_argument("--max-batch", type=int, default=16, help="N for celery-batches and ours")
    ap.add_argument("--max-wait-ms", type=float, default=50.0,
                    help="our max wait and celery-batches' flush_interval")
    ap.add_argument("--systems", default=",".join(ALL_SYSTEMS))
    ap.add_argument("--seed", type=int, default=20240601, help="arrival schedule seed")
    ap.add_argument("--stop-p99", type=float, default=30.0,
                    help="offer a system no higher load once its p99 exceeds this (s)")
    ap.add_argument("--drain-timeout", type=float, default=90.0,
                    help="seconds after the last arrival to wait for completions")
    ap.add_argument("--redis", default="redis://127.0.0.1:6379",
                    help="Redis base URL (no DB); databases db-base.. are flushed")
    ap.add_argument("--db-base", type=int, default=12,
                    help="plain, batches, ours use this DB and the next two")
    ap.add_argument("--venv", type=Path, default=REPO / "bench" / ".venvs" / "batches")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "batching_peers.json")
    ap.add_argument("--quick", action="store_true", help="smoke test: one low load, 5 s")
    args = ap.parse_args(argv)

    loads = [float(x) for x in args.loads.split(",") if x.strip()]
    duration = args.duration
    if args.quick:
        loads, duration = [2.0], 5.0
    names = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = set(names) - set(ALL_SYSTEMS)
    if unknown:
        ap.error(f"unknown systems: {', '.join(sorted(unknown))}")

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    cost = COST_MODELS[COST_MODEL]
    capacity = {"batch_1_img_s": 1.0 / cost.batch_s(1, STEPS),
                f"batch_{args.max_batch}_img_s": args.max_batch / cost.batch_s(args.max_batch, STEPS)}
    started = datetime.now(timezone.utc)
    tmp = Path(tempfile.mkdtemp(prefix="batching-peers-"))
    logs = tmp / "logs"
    logs.mkdir()
    points: list[Point] = []
    stopped: dict[str, str] = {}
    try:
        systems = build_systems(names, args.redis, args.db_base, args.max_batch,
                                args.max_wait_ms, tmp, args.venv)
        log(f"{ENGINE_LABEL}: capacity at batch 1 {capacity['batch_1_img_s']:.2f} img/s, "
            f"at batch {args.max_batch} {capacity[f'batch_{args.max_batch}_img_s']:.2f} img/s; "
            f"worker logs in {logs}")
        for system in systems:
            for k, rate in enumerate(loads):
                point = run_point(system, rate, duration, args.seed + k, args.drain_timeout,
                                  logs, log)
                points.append(point)
                if not point.drained or point.p99_s > args.stop_p99:
                    if k + 1 < len(loads):
                        stopped[system.name] = (f"not offered {', '.join(f'{x:g}' for x in loads[k + 1:])}"
                                                f" img/s: p99 {fmt_s(point.p99_s)} s at {rate:g}")
                        log(f"{system.name}: {stopped[system.name]}")
                    break
    finally:
        shutil.rmtree(tmp / "images", ignore_errors=True)

    header = (f"Batching peers - {ENGINE_LABEL}; max batch N = {args.max_batch}, "
              f"max wait / flush interval {args.max_wait_ms:g} ms; {duration:g} s of Poisson "
              f"arrivals per point\n{platform.platform()}, {os.cpu_count()} CPUs; cost-model "
              f"capacity: {capacity['batch_1_img_s']:.2f} img/s one at a time, "
              f"{capacity[f'batch_{args.max_batch}_img_s']:.2f} img/s in full batches of "
              f"{args.max_batch}")
    print(table(points, header))
    for name, why in stopped.items():
        print(f"  {name}: {why}")

    report = {
        "benchmark": "batching_peers",
        "engine": ENGINE_LABEL,
        "engine_is_synthetic": True,
        "cost_model": {"name": COST_MODEL, **asdict(cost), "steps": STEPS,
                       "capacity_img_s": capacity},
        "date": started.isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                    "python": platform.python_version()},
        "config": {"loads_img_s": loads, "duration_s": duration, "max_batch": args.max_batch,
                   "max_wait_ms": args.max_wait_ms, "seed": args.seed,
                   "stop_p99_s": args.stop_p99, "drain_timeout_s": args.drain_timeout,
                   "quick": args.quick},
        "systems": {s.name: {"description": s.description, "task": s.task_name,
                             "settings": s.settings} for s in systems},
        "stopped": stopped,
        "definitions": {
            "latency": "result stored in Redis (SUCCESS published) - send_task call",
            "achieved_img_s": "completed / (last completion - first submit)",
            "mean_batch": "images / distinct batches, from each result's batch id and size",
            "saturated": "backlog slope over the second half of arrivals > 10% of offered load,"
                         " or not all requests done by the drain deadline",
            "percentiles": "nearest rank; requests not done by the deadline count as infinite",
            "requests": "[submit offset s, latency s or null, batch size or null] per request",
        },
        "points": [asdict(p) for p in points],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(jsonable(report), indent=1) + "\n")
    print(f"\nraw figures: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
