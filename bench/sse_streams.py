"""Many open event streams against the API, served as ``imagegenx up`` serves it.

Starts a synthetic-engine worker (cost model ``sd15-h200``: a step of n images
takes 13 + 3.3 n ms, so requests run for seconds and report progress) and the
API under gunicorn's gevent workers, submits ``--streams`` requests and opens
one ``GET /api/v1/tasks/<id>/events`` stream per request (some of them queued,
some running). While all streams are open it measures other requests
(``GET /healthz`` and an authenticated ``GET /api/v1/tasks/<id>``) from a few
concurrent clients for ``--seconds``; the same clients measure first with no
stream open, for comparison. A request unanswered within 5 s counts as an error.

    python -m bench.sse_streams        # prints a table, writes docs/benchmarks/sse_streams.json
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import requests

from bench.harness import REPO, celery_worker_cmd, free_port, machine, now_utc, percentiles, process
from imagegenx.client import FINAL_EVENTS, parse_sse
from imagegenx.launcher import api_command
from imagegenx.settings import Settings

KEY = "sse-streams-key"
TIMEOUT_S = 5.0


class Streams:
    """One thread per open stream, counting the events each receives. Runs in a
    process of its own (:func:`run_streams`), so that its 200 threads do not
    share an interpreter lock with the clients whose latency is measured."""

    def __init__(self, base: str, task_ids: list[str]) -> None:
        self.base = base
        self.task_ids = task_ids
        self.events: Counter[str] = Counter()
        self.open = 0
        self.errors = 0
        self.finished = 0
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._follow, args=(t,), daemon=True)
                        for t in task_ids]

    def _follow(self, task_id: str) -> None:
        try:
            with requests.get(f"{self.base}/api/v1/tasks/{task_id}/events", stream=True,
                              headers={"X-API-Key": KEY}, timeout=(5, 60)) as r:
                if r.status_code != 200:
                    raise RuntimeError(f"{r.status_code}")
                with self.lock:
                    self.open += 1
                try:
                    for event in parse_sse(r.iter_lines(decode_unicode=True)):
                        with self.lock:
                            self.events[event.event] += 1
                        if event.event in FINAL_EVENTS:
                            with self.lock:
                                self.finished += 1
                            break
                        if self.stop.is_set():
                            break
                finally:
                    with self.lock:
                        self.open -= 1
        except Exception:  # noqa: BLE001 - counted
            with self.lock:
                self.errors += 1

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def counts(self) -> dict[str, Any]:
        with self.lock:
            return {"open": self.open, "errors": self.errors, "finished": self.finished,
                    "events": dict(self.events)}


def run_streams(base: str, task_ids: list[str], commands: Any, reports: Any) -> None:
    """In a child process: open the streams; answer each command with the counts."""
    streams = Streams(base, task_ids)
    streams.start()
    while True:
        command = commands.get()
        reports.put(streams.counts())
        if command == "stop":
            streams.stop.set()
            return


def measure(base: str, task_id: str, clients: int, seconds: float) -> dict[str, Any]:
    """Latencies of other requests from ``clients`` concurrent clients."""
    results: dict[str, list[float]] = {"healthz": [], "task": []}
    errors: dict[str, int] = {"healthz": 0, "task": 0}
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def client() -> None:
        session = requests.Session()
        i = 0
        while time.monotonic() < deadline:
            name = "healthz" if i % 2 == 0 else "task"
            url = f"{base}/healthz" if name == "healthz" else f"{base}/api/v1/tasks/{task_id}"
            t0 = time.perf_counter()
            try:
                ok = session.get(url, headers={"X-API-Key": KEY}, timeout=TIMEOUT_S).status_code == 200
            except requests.RequestException:
                ok = False
            elapsed = (time.perf_counter() - t0) * 1000 if ok else TIMEOUT_S * 1000
            with lock:
                results[name].append(elapsed)
                errors[name] += 0 if ok else 1
            i += 1
            time.sleep(0.01)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out: dict[str, Any] = {}
    every = results["healthz"] + results["task"]
    for name, values in (*results.items(), ("all", every)):
        n_err = sum(errors.values()) if name == "all" else errors[name]
        out[name] = {"requests": len(values), "errors": n_err,
                     **{k: round(v, 2) for k, v in percentiles(values).items()}}
    return out


def submit(base: str, n: int, steps: int) -> list[str]:
    session = requests.Session()
    ids = []
    for i in range(n):
        r = session.post(f"{base}/api/v1/images", headers={"X-API-Key": KEY}, timeout=10,
                         json={"prompt": f"a red circle {i}", "seed": i, "steps": steps,
                               "width": 64, "height": 64})
        r.raise_for_status()
        ids.append(r.json()["task_id"])
    return ids


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.sse_streams", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--redis", default="redis://127.0.0.1:6379/8")
    ap.add_argument("--streams", type=int, default=200)
    ap.add_argument("--steps", type=int, default=100, help="denoising steps of each request")
    ap.add_argument("--clients", type=int, default=4, help="concurrent clients of other requests")
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks" / "sse_streams.json")
    args = ap.parse_args(argv)

    queue = f"sse-{uuid.uuid4().hex[:8]}"
    tmp = Path(tempfile.mkdtemp(prefix="sse-streams-"))
    env = {"IMAGEGENX_BROKER_URL": args.redis, "IMAGEGENX_RESULT_BACKEND": args.redis,
           "IMAGEGENX_QUEUE": queue, "IMAGEGENX_ENGINE": "synthetic",
           "IMAGEGENX_SYNTHETIC_COST": "sd15-h200", "IMAGEGENX_MAX_BATCH": "32",
           "IMAGEGENX_API_KEYS": KEY, "IMAGEGENX_STORAGE_ROOT": str(tmp / "images"),
           "IMAGEGENX_WORKER_METRICS_PORT": "0",
           # One address and one key: limits would measure the limiter.
           "IMAGEGENX_HEALTH_RATE_LIMIT": "", "IMAGEGENX_STATUS_RATE_LIMIT": "",
           "IMAGEGENX_RATE_LIMIT": "", "IMAGEGENX_MAX_UNFINISHED_PER_KEY": "0",
           "IMAGEGENX_COST_BUDGET_PER_MINUTE": "0", "IMAGEGENX_MAX_REQUEST_COST": "0"}
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    cmd = api_command(Settings(api_host="127.0.0.1", api_port=port))
    try:
        with process(celery_worker_cmd(hostname=f"{queue}@%h"), env, tmp / "worker.log", ready=" ready."), \
                process(cmd, env, tmp / "api.log", ready_url=f"{base}/api/v1/openapi.json", grace_s=15):
            for _ in range(100):  # the worker answers its first ping
                if requests.get(f"{base}/healthz", timeout=5).status_code == 200:
                    break
                time.sleep(0.2)
            (probe,) = submit(base, 1, 1)
            while requests.get(f"{base}/api/v1/tasks/{probe}", headers={"X-API-Key": KEY},
                               timeout=5).json()["state"] != "SUCCESS":
                time.sleep(0.1)
            baseline = measure(base, probe, args.clients, 5.0)
            ids = submit(base, args.streams, args.steps)
            ctx = multiprocessing.get_context("spawn")
            commands, reports = ctx.Queue(), ctx.Queue()
            child = ctx.Process(target=run_streams, args=(base, ids, commands, reports))
            child.start()
            counts: dict[str, Any] = {"open": 0, "errors": 0, "finished": 0}
            for _ in range(100):
                commands.put("count")
                counts = reports.get(timeout=30)
                if counts["open"] + counts["errors"] + counts["finished"] >= args.streams:
                    break
                time.sleep(0.1)
            t0 = time.monotonic()
            loaded = measure(base, probe, args.clients, args.seconds)
            commands.put("stop")
            end = reports.get(timeout=30)
            child.join(30)
            held = {"open_at_start": counts["open"], "open_at_end": end["open"],
                    "finished_during": end["finished"] - counts["finished"],
                    "errors": end["errors"], "events": end["events"],
                    "seconds": round(time.monotonic() - t0, 2)}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report = {"benchmark": "sse_streams", "date": now_utc(), "machine": machine(),
              "command": "python -m bench.sse_streams " + " ".join(argv or sys.argv[1:]),
              "api_command": cmd, "streams": args.streams, "steps": args.steps,
              "clients": args.clients, "seconds": args.seconds, "timeout_s": TIMEOUT_S,
              "no_streams": baseline, "with_streams": loaded, "stream_stats": held,
              # The machine is shared: its load says how much else ran meanwhile.
              "load_average_1m_at_end": round(os.getloadavg()[0], 2)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\n{args.streams} event streams ({held['open_at_start']} open at the start, "
          f"{held['open_at_end']} at the end, {held['errors']} errors), {args.clients} clients, "
          f"{args.seconds:g} s, {report['machine']['cpus']} CPUs, load average "
          f"{report['load_average_1m_at_end']}, {report['date']}")
    print(f"  events received meanwhile: {held['events']}")
    print(f"  {'streams':<10} {'request':<8} {'n':>6} {'errors':>6} {'p50 ms':>8} {'p99 ms':>8}")
    for label, block in (("none", baseline), (str(args.streams), loaded)):
        for name in ("healthz", "task", "all"):
            r = block[name]
            print(f"  {label:<10} {name:<8} {r['requests']:>6} {r['errors']:>6} "
                  f"{r['p50']:>8.1f} {r['p99']:>8.1f}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
