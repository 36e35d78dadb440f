"""Load test: offer twice the worker's capacity and check the service holds.

Starts the real processes on loopback (gunicorn API, one ``celery -A tasks
worker`` with the synthetic engine and the ``sd15-h200`` cost model, Redis),
then:

1. capacity: measures the worker's throughput with full batches (closed loop,
   ``--calibrate-s``), or takes ``--capacity`` as given;
2. overload: offers ``--overload`` x capacity requests/s, open loop at a
   constant rate, for ``--duration`` seconds (never more than
   ``--max-requests``). The API refuses submissions with 503 + Retry-After
   while more than ``max_queue_depth`` requests wait;
3. drain: stops offering and waits until every accepted request is finished
   (at most ``--drain-timeout`` seconds).

Checks: the submit endpoint stays responsive (p99 of POST latency <= 50 ms),
the queue grows and drains back to empty, and no accepted request is lost
(every 202 reaches SUCCESS). Prints a table, writes JSON, exits 1 if a check
fails. Figures are labelled synthetic: the engine sleeps as one H200 would.
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import redis
import requests

from bench.harness import (
    REPO, ResultCollector, celery_worker_cmd, free_port, machine, now_utc, percentiles, process,
)

KEY = "load-test-key"
STEPS = 20
COST = "sd15-h200"
P99_TARGET_MS = 50.0


def service_env(redis_url: str, queue: str, tmp: Path, port: int, max_batch: int,
                max_queue_depth: int) -> dict[str, str]:
    return {
        "IMAGEGENX_BROKER_URL": redis_url, "IMAGEGENX_RESULT_BACKEND": redis_url,
        "IMAGEGENX_QUEUE": queue, "IMAGEGENX_ENGINE": "synthetic",
        "IMAGEGENX_SYNTHETIC_COST": COST, "IMAGEGENX_STORAGE_ROOT": str(tmp / "images"),
        "IMAGEGENX_API_KEYS": KEY, "IMAGEGENX_MAX_BATCH": str(max_batch),
        "IMAGEGENX_MAX_NUM_IMAGES": str(min(4, max_batch)),
        "IMAGEGENX_PUBLIC_URL": f"http://127.0.0.1:{port}",
        "IMAGEGENX_PROGRESS_INTERVAL_S": "1", "IMAGEGENX_EXPECTED_BATCH_S": "10",
        "IMAGEGENX_MAX_QUEUE_DEPTH": str(max_queue_depth),
        # One client key sends everything here: a per-key limit would measure
        # the limiter, not the queue. It stays on (and counts in Redis) at a
        # level this test never reaches, so its cost is in the figures.
        "IMAGEGENX_RATE_LIMIT": "1000000/minute",
        "IMAGEGENX_COST_BUDGET_PER_MINUTE": "0", "IMAGEGENX_MAX_REQUEST_COST": "0",
        # cost_model_capacity prices every step with guidance (two UNet rows per image).
        "IMAGEGENX_GUIDANCE_INTERVAL": "0,1",
    }


def body(i: int) -> dict[str, Any]:
    return {"prompt": f"load test prompt {i}", "seed": i, "steps": STEPS}


def pct(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p95": None, "p99": None, "mean": None}
    return dict(percentiles(values))


def cost_model_capacity(max_batch: int) -> float:
    from imagegenx.engine.synthetic import COST_MODELS

    return max_batch / COST_MODELS[COST].batch_s(max_batch, STEPS)


class Sender:
    """POSTs from a thread pool; one requests.Session per thread."""

    def __init__(self, base: str, threads: int) -> None:
        self.url = f"{base}/api/v1/images"
        self.local = threading.local()
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="load")

    def _session(self) -> requests.Session:
        s = getattr(self.local, "s", None)
        if s is None:
            s = self.local.s = requests.Session()
        return s

    def post(self, i: int) -> dict[str, Any]:
        t0 = time.perf_counter()
        try:
            r = self._session().post(self.url, json=body(i), headers={"X-API-Key": KEY}, timeout=10)
        except requests.RequestException as exc:
            return {"i": i, "t": t0, "ms": (time.perf_counter() - t0) * 1000, "status": None,
                    "error": type(exc).__name__}
        ms = (time.perf_counter() - t0) * 1000
        out: dict[str, Any] = {"i": i, "t": t0, "ms": ms, "status": r.status_code}
        if r.status_code == 202:
            out["task_id"] = r.json()["task_id"]
        else:
            out["retry_after"] = r.headers.get("Retry-After")
            out["error"] = r.text[:200]
        return out


def calibrate(sender: Sender, collector: ResultCollector, clients: int, seconds: float) -> float:
    """Closed loop with enough clients to keep batches full: images/s the worker serves."""
    stop = time.perf_counter() + seconds
    done_times: list[float] = []
    lock = threading.Lock()
    counter = iter(range(10**9, 2 * 10**9))

    def client() -> None:
        while time.perf_counter() < stop:
            res = sender.post(next(counter))
            if res["status"] != 202:
                time.sleep(0.05)
                continue
            ev = collector.watch(res["task_id"], res["t"])
            if ev.wait(60):
                with lock:
                    done_times.append(time.perf_counter())

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # Skip the first third (batches still forming). Requests of one batch finish
    # together: count those finishing after the first batch of the tail, over
    # the time from that batch to the last one.
    start = min(done_times) + seconds / 3 if done_times else 0.0
    tail = sorted(t for t in done_times if t >= start)
    later = [t for t in tail if t > tail[0] + 0.1] if tail else []
    if not later:
        raise RuntimeError("calibration saw too few completions")
    return len(later) / (tail[-1] - tail[0])


def run(args: argparse.Namespace, log: Any = print) -> dict[str, Any]:
    queue = f"load-{uuid.uuid4().hex[:8]}"
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    client = redis.Redis.from_url(args.redis)
    tmp = Path(tempfile.mkdtemp(prefix="load-test-"))
    env = service_env(args.redis, queue, tmp, port, args.max_batch, args.max_queue_depth)
    api_cmd = [sys.executable, "-m", "gunicorn", "--worker-class", "gthread", "--workers", "2",
               "--threads", "8", "--bind", f"127.0.0.1:{port}", "imagegenx.api:create_app()"]
    try:
        with process(celery_worker_cmd(hostname=f"{queue}@%h"), env, tmp / "worker.log",
                     ready=" ready."), \
                process(api_cmd, env, tmp / "api.log", ready_url=f"{base}/api/v1/openapi.json"):
            collector = ResultCollector(args.redis, interval=0.05).start()
            sender = Sender(base, args.threads)
            try:
                return _measure(args, sender, collector, client, queue, log)
            finally:
                collector.stop()
                sender.pool.shutdown(wait=True)
    finally:
        client.delete(queue)
        shutil.rmtree(tmp, ignore_errors=True)


def _measure(args: argparse.Namespace, sender: Sender, collector: ResultCollector,
             client: redis.Redis, queue: str, log: Any) -> dict[str, Any]:
    model_capacity = cost_model_capacity(args.max_batch)
    if args.capacity:
        capacity, how = args.capacity, "given"
    else:
        log(f"calibrating for {args.calibrate_s:.0f} s (cost model: {model_capacity:.2f} img/s)")
        capacity, how = calibrate(sender, collector, 3 * args.max_batch, args.calibrate_s), "measured"
        for _ in range(200):  # let the calibration traffic finish
            if not collector.pending and client.llen(queue) == 0:
                break
            time.sleep(0.05)
    collector.done.clear()
    rate = args.overload * capacity
    n_total = min(args.max_requests, math.ceil(rate * args.duration))
    log(f"capacity {capacity:.2f} img/s ({how}); offering {rate:.2f} req/s for "
        f"{args.duration:.0f} s ({n_total} requests), max_queue_depth {args.max_queue_depth}")

    timeline: list[dict[str, float]] = []
    sampling = threading.Event()
    t_start = time.perf_counter()

    def sample() -> None:
        while not sampling.is_set():
            timeline.append({"t": time.perf_counter() - t_start, "queue": client.llen(queue),
                             "done": len(collector.done)})
            sampling.wait(0.25)

    def post_and_watch(i: int) -> dict[str, Any]:
        res = sender.post(i)
        if res["status"] == 202:
            collector.watch(res["task_id"], res["t"])
        return res

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    futures = []
    lateness: list[float] = []
    for i in range(n_total):
        due = t_start + i / rate
        now = time.perf_counter()
        if due > now:
            time.sleep(due - now)
        lateness.append(max(0.0, time.perf_counter() - due) * 1000)
        futures.append(sender.pool.submit(post_and_watch, i))
    results = [f.result() for f in futures]
    t_offer_end = time.perf_counter()
    accepted = [r for r in results if r["status"] == 202]
    refused = [r for r in results if r["status"] == 503]
    other = [r for r in results if r["status"] not in (202, 503)]
    log(f"offered {len(results)}: {len(accepted)} accepted, {len(refused)} refused (503), "
        f"{len(other)} other; draining")

    deadline = time.perf_counter() + args.drain_timeout
    while time.perf_counter() < deadline:
        if not collector.pending and client.llen(queue) == 0:
            break
        time.sleep(0.1)
    t_drained = time.perf_counter()
    sampling.set()
    sampler.join()
    timeline.append({"t": t_drained - t_start, "queue": client.llen(queue), "done": len(collector.done)})

    # Every accepted task must be SUCCESS in the result backend.
    ids = [r["task_id"] for r in accepted]
    metas = []
    for k in range(0, len(ids), 500):
        metas += client.mget([f"celery-task-meta-{i}" for i in ids[k:k + 500]])
    states: dict[str, int] = {}
    for raw in metas:
        state = json.loads(raw)["status"] if raw else "MISSING"
        states[state] = states.get(state, 0) + 1
    lost = len(ids) - states.get("SUCCESS", 0)

    ok_done = [d for d in collector.done.values() if d[2].get("status") == "SUCCESS"]
    finish = sorted(end for _, end, _ in ok_done)
    in_overload = [t for t in finish if t <= t_offer_end]
    served = (len(in_overload) / (t_offer_end - t_start)) if in_overload else 0.0
    lat_all = [r["ms"] for r in results]
    max_queue = max(p["queue"] for p in timeline)
    final_queue = timeline[-1]["queue"]
    retry_after_ok = all(r.get("retry_after") for r in refused)
    summary = {
        "capacity_img_s": capacity, "capacity_source": how, "cost_model_capacity_img_s": model_capacity,
        "offered_req_s": rate, "offered_x_capacity": args.overload,
        "achieved_offer_req_s": len(results) / (t_offer_end - t_start),
        "served_during_overload_img_s": served,
        "requests": len(results), "accepted": len(accepted), "refused_503": len(refused),
        "other_status": len(other), "refused_with_retry_after": retry_after_ok,
        "post_latency_ms": pct(lat_all) | {"max": max(lat_all)},
        "post_latency_202_ms": pct([r["ms"] for r in accepted]),
        "post_latency_503_ms": pct([r["ms"] for r in refused]),
        "dispatch_lateness_ms": pct(lateness),
        "max_queue_depth_seen": max_queue, "max_queue_depth_setting": args.max_queue_depth,
        "final_queue_depth": final_queue,
        "overload_s": t_offer_end - t_start, "drain_s": t_drained - t_offer_end,
        "result_states": states, "lost": lost,
        "request_latency_s": pct([(end - sub) for sub, end, _ in ok_done]),
    }
    checks = {
        "p99_post_latency_le_50ms": summary["post_latency_ms"]["p99"] <= P99_TARGET_MS,
        "queue_grew": max_queue > args.max_batch,
        "queue_drained": final_queue == 0 and not collector.pending,
        "zero_lost": lost == 0 and not other,
        "refusals_carry_retry_after": retry_after_ok,
    }
    return {"summary": summary, "checks": checks,
            "timeline": [{k: round(v, 3) for k, v in p.items()} for p in timeline]}


def print_report(report: dict[str, Any]) -> None:
    s = report["summary"]
    lat = s["post_latency_ms"]
    print(f"\nLoad test, synthetic {COST} engine, {report['machine']['cpus']} CPUs, {report['date']}")
    rows = [
        ("worker capacity (img/s)", f"{s['capacity_img_s']:.2f} ({s['capacity_source']}; "
                                    f"cost model {s['cost_model_capacity_img_s']:.2f})"),
        ("offered (req/s)", f"{s['offered_req_s']:.2f} = {s['offered_x_capacity']:g} x capacity "
                            f"(achieved {s['achieved_offer_req_s']:.2f})"),
        ("served while overloaded (img/s)", f"{s['served_during_overload_img_s']:.2f}"),
        ("requests / accepted / 503", f"{s['requests']} / {s['accepted']} / {s['refused_503']}"),
        ("other answers", str(s["other_status"])),
        ("POST latency p50 / p95 / p99 / max (ms)",
         f"{lat['p50']:.1f} / {lat['p95']:.1f} / {lat['p99']:.1f} / {lat['max']:.1f}"),
        ("max queue depth (limit)", f"{s['max_queue_depth_seen']} ({s['max_queue_depth_setting']})"),
        ("overload / drain (s)", f"{s['overload_s']:.1f} / {s['drain_s']:.1f}"),
        ("final queue depth", str(s["final_queue_depth"])),
        ("result states of accepted", json.dumps(s["result_states"])),
        ("lost", str(s["lost"])),
    ]
    width = max(len(r[0]) for r in rows)
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")
    print("checks: " + ", ".join(f"{k} {'PASS' if v else 'FAIL'}" for k, v in report["checks"].items()))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.load_test", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--redis", default="redis://127.0.0.1:6379/8", help="Redis URL (a private queue is used)")
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of overload")
    ap.add_argument("--overload", type=float, default=2.0, help="offered load / capacity")
    ap.add_argument("--capacity", type=float, default=0.0,
                    help="worker capacity in images/s; 0: measure it first")
    ap.add_argument("--calibrate-s", type=float, default=12.0)
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--max-queue-depth", type=int, default=300)
    ap.add_argument("--max-requests", type=int, default=5000, help="bound on requests offered")
    ap.add_argument("--threads", type=int, default=32, help="client threads")
    ap.add_argument("--drain-timeout", type=float, default=180.0)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "load_test.json")
    ap.add_argument("--copy-to", default=str(REPO / "docs" / "benchmarks" / "load_test.json"),
                    help="also write the JSON here ('' : nowhere)")
    args = ap.parse_args(argv)

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    measured = run(args, log)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    report = {"benchmark": "load_test", "date": now_utc(), "machine": machine(),
              "engine": f"synthetic ({COST} cost model)", "steps": STEPS, "config": config,
              **measured}
    text = json.dumps(report, indent=2)
    for path in (args.out, Path(args.copy_to) if args.copy_to else None):
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    print_report(report)
    print(f"JSON: {args.out}")
    return 0 if all(report["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
