"""Slow and idle clients against the API, served as ``imagegenx up`` serves it.

For each way of serving (gevent workers, the configuration ``imagegenx up`` and
the Procfile use; and the former gthread setup, 2 workers x 8 threads, for
comparison) this starts a synthetic-engine worker and the API, opens 500 idle
connections that sent half a request (``GET /healthz HTTP/1.1\\r\\nHost: x\\r\\n``
and nothing more) plus 8 slow clients that send one more header byte every
second, then measures normal requests (GET /healthz and an authenticated
GET /api/v1/tasks/<id>) from a few concurrent clients for ``--seconds``.
A request unanswered within 5 s counts as an error (and as 5000 ms).

    python -m bench.slow_clients            # prints a table, writes docs/benchmarks/slow_clients.json
"""
from __future__ import annotations

import argparse
import json
import shutil
import socket
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import requests

from bench.harness import REPO, celery_worker_cmd, free_port, machine, measure_requests, now_utc, process
from imagegenx.launcher import api_command
from imagegenx.settings import Settings

KEY = "slow-clients-key"
HALF_REQUEST = b"GET /healthz HTTP/1.1\r\nHost: x\r\n"
TIMEOUT_S = 5.0


def gthread_command(port: int) -> list[str]:
    """The API as it was served before: gthread, 2 workers x 8 threads."""
    return [sys.executable, "-m", "gunicorn", "--worker-class", "gthread", "--workers", "2",
            "--threads", "8", "--bind", f"127.0.0.1:{port}", "imagegenx.api:create_app()"]


def gevent_command(port: int) -> list[str]:
    """The API exactly as ``imagegenx up`` starts it."""
    return api_command(Settings(api_host="127.0.0.1", api_port=port))


@contextmanager
def held_connections(port: int, idle: int, slow: int) -> Iterator[list[socket.socket]]:
    """``idle`` half-sent requests, plus ``slow`` that trickle one header byte a second."""
    socks: list[socket.socket] = []
    stop = threading.Event()

    def trickle(s: socket.socket) -> None:
        while not stop.wait(1.0):
            try:
                s.sendall(b"X")
            except OSError:
                return

    try:
        for i in range(idle + slow):
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            s.sendall(HALF_REQUEST + (b"X-Slow: " if i >= idle else b""))
            socks.append(s)
        for s in socks[idle:]:
            threading.Thread(target=trickle, args=(s,), daemon=True).start()
        yield socks
    finally:
        stop.set()
        for s in socks:
            s.close()


def measure(base: str, clients: int, seconds: float) -> dict[str, Any]:
    """Latencies of normal requests from ``clients`` concurrent clients (unknown tasks: 404)."""
    return measure_requests(base, KEY, clients, seconds, task_path=lambda: f"/api/v1/tasks/{uuid.uuid4()}",
                            task_status=404, timeout_s=TIMEOUT_S)


def run_setup(name: str, cmd: list[str], port: int, env: dict[str, str], tmp: Path,
              args: argparse.Namespace) -> dict[str, Any]:
    base = f"http://127.0.0.1:{port}"
    with process(cmd, env, tmp / f"api-{name}.log", ready_url=f"{base}/api/v1/openapi.json", grace_s=15):
        for _ in range(100):  # the worker answers its first ping
            if requests.get(f"{base}/healthz", timeout=5).status_code == 200:
                break
            time.sleep(0.2)
        baseline = measure(base, args.clients, 2.0)
        with held_connections(port, args.idle, args.slow):
            time.sleep(1.0)
            loaded = measure(base, args.clients, args.seconds)
    return {"setup": name, "command": cmd, "no_held_connections": baseline["all"], **loaded}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.slow_clients", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--redis", default="redis://127.0.0.1:6379/8")
    ap.add_argument("--idle", type=int, default=500, help="idle half-open connections")
    ap.add_argument("--slow", type=int, default=8, help="clients trickling header bytes")
    ap.add_argument("--clients", type=int, default=4, help="concurrent normal clients")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks" / "slow_clients.json")
    args = ap.parse_args(argv)

    queue = f"slow-{uuid.uuid4().hex[:8]}"
    tmp = Path(tempfile.mkdtemp(prefix="slow-clients-"))
    env = {"IMAGEGENX_BROKER_URL": args.redis, "IMAGEGENX_RESULT_BACKEND": args.redis,
           "IMAGEGENX_QUEUE": queue, "IMAGEGENX_ENGINE": "synthetic", "IMAGEGENX_API_KEYS": KEY,
           "IMAGEGENX_STORAGE_ROOT": str(tmp / "images"), "IMAGEGENX_WORKER_METRICS_PORT": "0",
           # The clients here are one address and one key: limits would measure the limiter.
           "IMAGEGENX_HEALTH_RATE_LIMIT": "", "IMAGEGENX_STATUS_RATE_LIMIT": ""}
    setups = []
    try:
        with process(celery_worker_cmd(hostname=f"{queue}@%h"), env, tmp / "worker.log", ready=" ready."):
            for name, command in (("gevent (imagegenx up)", gevent_command), ("gthread 2x8", gthread_command)):
                port = free_port()
                print(f"[{time.strftime('%H:%M:%S')}] {name}", file=sys.stderr, flush=True)
                setups.append(run_setup(name, command(port), port, env, tmp, args))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report = {"benchmark": "slow_clients", "date": now_utc(), "machine": machine(),
              "idle_connections": args.idle, "slow_clients": args.slow, "clients": args.clients,
              "seconds": args.seconds, "timeout_s": TIMEOUT_S, "setups": setups}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\n{args.idle} idle + {args.slow} slow connections, {args.clients} clients, "
          f"{args.seconds:g} s, {report['machine']['cpus']} CPUs, {report['date']}")
    print(f"  {'setup':<22} {'request':<8} {'n':>6} {'errors':>6} {'p50 ms':>8} {'p99 ms':>8}")
    for s in setups:
        for name in ("healthz", "task", "all"):
            r = s[name]
            print(f"  {s['setup']:<22} {name:<8} {r['requests']:>6} {r['errors']:>6} "
                  f"{r['p50']:>8.1f} {r['p99']:>8.1f}")
        r = s["no_held_connections"]
        print(f"  {s['setup']:<22} {'none held':<8} {r['requests']:>6} {r['errors']:>6} "
              f"{r['p50']:>8.1f} {r['p99']:>8.1f}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
