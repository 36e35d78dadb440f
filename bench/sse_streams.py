"""Many open event streams against the API, served as ``imagegenx up`` serves it.

Starts a synthetic-engine worker (cost model ``sd15-h200``: a step of n images
takes 13 + 3.3 n ms, so requests run for seconds and report progress) and the
API under gunicorn's gevent workers. Other requests (``GET /healthz`` and an
authenticated ``GET /api/v1/tasks/<id>``) from a few concurrent clients are
measured for ``--seconds`` in three phases: the service idle; the worker busy
with ``2 x --streams`` requests and no stream open; the same load with one
``GET /api/v1/tasks/<id>/events`` stream open for each of ``--streams`` requests
not finished yet (the running ones and the queued ones), read by a process of
its own (one thread, a selector over raw sockets). The second and third phases differ only by the streams. A request
unanswered within 5 s counts as an error. The API processes' CPU time is
recorded per phase.

    python -m bench.sse_streams        # prints a table, writes docs/benchmarks/sse_streams.json
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import selectors
import shutil
import socket
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import requests

from bench.harness import REPO, celery_worker_cmd, free_port, machine, measure_requests, now_utc, process
from imagegenx.client import FINAL_EVENTS
from imagegenx.launcher import api_command
from imagegenx.settings import Settings

KEY = "sse-streams-key"
TIMEOUT_S = 5.0


class Streams:
    """All streams on one thread: raw sockets under a selector, HTTP/1.0 so the body
    ends when the server closes it. Lighter than a thread and an HTTP client per
    stream: on a 2-core machine the load generator competes with the API."""

    def __init__(self, base: str, task_ids: list[str]) -> None:
        parts = urlsplit(base)
        self.address = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.task_ids = task_ids
        self.events: Counter[str] = Counter()
        self.open = 0
        self.errors = 0
        self.finished = 0
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        sel = selectors.DefaultSelector()
        buffers: dict[socket.socket, bytes] = {}
        for task_id in self.task_ids:
            try:
                sock = socket.create_connection(self.address, timeout=5)
                sock.sendall(f"GET /api/v1/tasks/{task_id}/events HTTP/1.0\r\nHost: x\r\n"
                             f"X-API-Key: {KEY}\r\nAccept: text/event-stream\r\n\r\n".encode())
                sock.setblocking(False)
                sel.register(sock, selectors.EVENT_READ)
                buffers[sock] = b""
            except OSError:
                with self.lock:
                    self.errors += 1
        headers_done: set[socket.socket] = set()
        opened: set[socket.socket] = set()
        while buffers and not self.stop.is_set():
            for key, _ in sel.select(timeout=0.2):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                try:
                    chunk = sock.recv(65536)
                except OSError:
                    chunk = b""
                data = buffers[sock] + chunk
                if sock not in headers_done and b"\r\n\r\n" in data:
                    head, data = data.split(b"\r\n\r\n", 1)
                    headers_done.add(sock)
                    ok = head.startswith(b"HTTP/1.1 200") or head.startswith(b"HTTP/1.0 200")
                    if ok:
                        opened.add(sock)
                    with self.lock:
                        self.open += int(ok)
                        self.errors += int(not ok)
                *blocks, rest = data.split(b"\n\n")
                buffers[sock] = rest
                for block in blocks:
                    for line in block.split(b"\n"):
                        if line.startswith(b"event: "):
                            name = line[7:].decode()
                            with self.lock:
                                self.events[name] += 1
                                self.finished += int(name in FINAL_EVENTS)
                if not chunk:
                    sel.unregister(sock)
                    sock.close()
                    del buffers[sock]
                    with self.lock:
                        self.open -= int(sock in opened)
        for sock in list(buffers):
            sock.close()

    def start(self) -> None:
        self.thread.start()

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
    """Latencies of other requests from ``clients`` concurrent clients (one task's status)."""
    return measure_requests(base, KEY, clients, seconds, task_path=lambda: f"/api/v1/tasks/{task_id}",
                            pause_s=0.01, timeout_s=TIMEOUT_S)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and its children (gunicorn's workers)."""
    import psutil

    procs = [psutil.Process(pid)]
    procs += procs[0].children(recursive=True)
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


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
                process(cmd, env, tmp / "api.log", ready_url=f"{base}/api/v1/openapi.json",
                        grace_s=15) as api:
            for _ in range(100):  # the worker answers its first ping
                if requests.get(f"{base}/healthz", timeout=5).status_code == 200:
                    break
                time.sleep(0.2)
            (probe,) = submit(base, 1, 1)
            while requests.get(f"{base}/api/v1/tasks/{probe}", headers={"X-API-Key": KEY},
                               timeout=5).json()["state"] != "SUCCESS":
                time.sleep(0.1)
            cpu0, t_base = cpu_seconds(api.pid), time.monotonic()
            baseline = measure(base, probe, args.clients, 5.0)
            baseline["api_cpu_share"] = round(
                (cpu_seconds(api.pid) - cpu0) / (time.monotonic() - t_base), 3)
            # The worker busy with twice as many requests as streams; first no stream open.
            ids = submit(base, 2 * args.streams, args.steps)
            t1, cpu0 = time.monotonic(), cpu_seconds(api.pid)
            busy = measure(base, probe, args.clients, args.seconds)
            busy["api_cpu_share"] = round((cpu_seconds(api.pid) - cpu0) / (time.monotonic() - t1), 3)
            # Then streams on the requests not finished yet (running ones and queued ones).
            done = 0
            while done < len(ids) and requests.get(
                    f"{base}/api/v1/tasks/{ids[done]}", headers={"X-API-Key": KEY},
                    timeout=5).json()["state"] == "SUCCESS":
                done += 1
            ids = ids[done:done + args.streams]
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
            t0, cpu0 = time.monotonic(), cpu_seconds(api.pid)
            loaded = measure(base, probe, args.clients, args.seconds)
            # CPU seconds per second of the API's processes (1.0 = one core busy).
            loaded["api_cpu_share"] = round((cpu_seconds(api.pid) - cpu0) / (time.monotonic() - t0), 3)
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
              "idle_no_streams": baseline, "busy_no_streams": busy, "busy_with_streams": loaded, "stream_stats": held,
              # The machine is shared: its load says how much else ran meanwhile.
              "load_average_1m_at_end": round(os.getloadavg()[0], 2)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\n{args.streams} event streams ({held['open_at_start']} open at the start, "
          f"{held['open_at_end']} at the end, {held['errors']} errors), {args.clients} clients, "
          f"{args.seconds:g} s, {report['machine']['cpus']} CPUs, load average "
          f"{report['load_average_1m_at_end']}, {report['date']}")
    print(f"  events received meanwhile: {held['events']}")
    print(f"  {'phase':<26} {'request':<8} {'n':>6} {'errors':>6} {'p50 ms':>8} {'p99 ms':>8} "
          f"{'API CPU':>8}")
    for label, block in (("idle, no stream", baseline), ("busy, no stream", busy),
                         (f"busy, {args.streams} streams", loaded)):
        for name in ("healthz", "task", "all"):
            r = block[name]
            print(f"  {label:<26} {name:<8} {r['requests']:>6} {r['errors']:>6} "
                  f"{r['p50']:>8.1f} {r['p99']:>8.1f} {block['api_cpu_share']:>8.3f}")
    print("  API CPU: the API processes' CPU seconds per second (1.0 = one core busy)")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
