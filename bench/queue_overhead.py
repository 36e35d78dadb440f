"""Benchmark 1: what the queue path itself costs, with a zero-cost engine.

Runs the real processes (gunicorn API, Redis, one ``celery -A tasks worker``)
with the synthetic engine at zero cost, so every millisecond measured is the
system's own: HTTP, validation, Redis, the batching consumer, PNG encoding and
storage, result writing. Side by side: the same work called in-process.

Rows:
- queue, sequential: one client, one request at a time (latency; the
  batching wait is part of it and reported separately);
- queue, concurrent: C clients in a closed loop for the duration (throughput);
- in-process, sequential and in batches of max_batch.

Targets: >= 150 images/s through the queue path; p50 <= max_wait + 15 ms.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import redis
import requests

from bench.harness import (
    ResultCollector, celery_worker_cmd, free_port, machine, now_utc, percentiles, process,
)

KEY = "bench-key"


def service_env(redis_url: str, tmp: Path, port: int, max_batch: int, max_wait_ms: float) -> dict[str, str]:
    return {
        "IMAGEGENX_BROKER_URL": redis_url, "IMAGEGENX_RESULT_BACKEND": redis_url,
        "IMAGEGENX_QUEUE": "bench-overhead", "IMAGEGENX_ENGINE": "synthetic",
        "IMAGEGENX_SYNTHETIC_COST": "zero", "IMAGEGENX_STORAGE_ROOT": str(tmp / "images"),
        "IMAGEGENX_API_KEYS": KEY, "IMAGEGENX_MAX_BATCH": str(max_batch),
        "IMAGEGENX_MAX_NUM_IMAGES": str(min(4, max_batch)),
        "IMAGEGENX_MAX_WAIT_MS": str(max_wait_ms), "IMAGEGENX_PUBLIC_URL": f"http://127.0.0.1:{port}",
        "IMAGEGENX_PROGRESS_INTERVAL_S": "1", "IMAGEGENX_EXPECTED_BATCH_S": "5",
        "IMAGEGENX_RATE_LIMIT": "", "IMAGEGENX_STATUS_RATE_LIMIT": "",
        "IMAGEGENX_COST_BUDGET_PER_MINUTE": "0", "IMAGEGENX_MAX_REQUEST_COST": "0",
    }


def body(i: int, num_images: int) -> dict[str, Any]:
    return {"prompt": f"benchmark prompt {i}", "seed": i, "num_images": num_images, "steps": 20}


def client_loop(base: str, collector: ResultCollector, stop_at: float, num_images: int,
                out: list[tuple[float, float]], errors: list[str]) -> None:
    session = requests.Session()
    headers = {"X-API-Key": KEY}
    i = 0
    while time.perf_counter() < stop_at:
        t0 = time.perf_counter()
        r = session.post(f"{base}/api/v1/images", json=body(i, num_images), headers=headers, timeout=30)
        if r.status_code != 202:
            errors.append(f"{r.status_code} {r.text[:200]}")
            continue
        ev = collector.watch(r.json()["task_id"], t0)
        if not ev.wait(60):
            errors.append("timeout")
        i += 1


def run_queue(base: str, collector: ResultCollector, clients: int, duration: float,
              num_images: int) -> dict[str, Any]:
    collector.done.clear()
    stop_at = time.perf_counter() + duration
    errors: list[str] = []
    threads = [threading.Thread(target=client_loop,
                                args=(base, collector, stop_at, num_images, [], errors))
               for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    done = list(collector.done.values())
    ok = [d for d in done if d[2]["status"] == "SUCCESS"]
    lat = [(end - sub) * 1000 for sub, end, _ in ok]
    sizes = [d[2]["result"]["batch"]["size"] for d in ok]
    return {"clients": clients, "num_images": num_images, "requests": len(ok),
            "failed": len(done) - len(ok) + len(errors), "seconds": elapsed,
            "requests_per_s": len(ok) / elapsed, "images_per_s": len(ok) * num_images / elapsed,
            "latency_ms": percentiles(lat), "mean_batch_images": sum(sizes) / max(1, len(sizes)),
            "errors": errors[:5]}


def run_inprocess(tmp: Path, duration: float, batch: int, num_images: int) -> dict[str, Any]:
    from imagegenx.engine.synthetic import SyntheticEngine
    from imagegenx.pipeline import BatchPipeline, resolve_request
    from imagegenx.request_state import RequestState
    from imagegenx.schemas import GenerateRequest
    from imagegenx.storage import LocalStorage

    engine = SyntheticEngine("zero")
    pipe = BatchPipeline(engine, LocalStorage(tmp / "inproc"), "http://127.0.0.1", "bench")
    lat: list[float] = []
    n = 0
    stop_at = time.perf_counter() + duration
    t_start = time.perf_counter()
    while time.perf_counter() < stop_at:
        states = [RequestState(uuid.uuid4().hex,
                               resolve_request(GenerateRequest(**body(n + k, num_images)), engine.native_size))
                  for k in range(batch)]
        t0 = time.perf_counter()
        out = pipe.run(states)
        lat.append((time.perf_counter() - t0) * 1000)
        assert all(o.result is not None for o in out.values())
        n += batch
    elapsed = time.perf_counter() - t_start
    return {"batch_requests": batch, "num_images": num_images, "requests": n,
            "seconds": elapsed, "requests_per_s": n / elapsed,
            "images_per_s": n * num_images / elapsed, "latency_ms": percentiles(lat)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--redis", default="redis://127.0.0.1:6379/7", help="Redis URL (a DB that is flushed)")
    ap.add_argument("--duration", type=float, default=60.0, help="seconds per concurrent run")
    ap.add_argument("--sequential-duration", type=float, default=15.0)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--max-wait-ms", type=float, default=50.0)
    ap.add_argument("--out", type=Path, default=Path("bench/results/queue_overhead.json"))
    args = ap.parse_args(argv)

    redis.Redis.from_url(args.redis).flushdb()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    rows: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        env = service_env(args.redis, tmp, port, args.max_batch, args.max_wait_ms)
        api_cmd = [sys.executable, "-m", "gunicorn", "--worker-class", "gthread", "--workers", "2",
                   "--threads", "16", "--bind", f"127.0.0.1:{port}", "imagegenx.api:create_app()"]
        with process(celery_worker_cmd(), env, tmp / "worker.log", ready=" ready."), \
                process(api_cmd, env, tmp / "api.log", ready_url=f"{base}/healthz"):
            collector = ResultCollector(args.redis).start()
            run_queue(base, collector, 4, 3.0, 1)  # warm-up
            rows["queue_sequential"] = run_queue(base, collector, 1, args.sequential_duration, 1)
            rows["queue_concurrent_1img"] = run_queue(base, collector, args.clients, args.duration, 1)
            rows["queue_concurrent_4img"] = run_queue(base, collector, args.clients, args.duration, 4)
            collector.stop()
        rows["inprocess_sequential"] = run_inprocess(tmp, args.sequential_duration, 1, 1)
        rows["inprocess_batched"] = run_inprocess(tmp, args.sequential_duration, args.max_batch, 1)

    seq = rows["queue_sequential"]["latency_ms"]["p50"]
    inproc = rows["inprocess_sequential"]["latency_ms"]["p50"]
    summary = {
        "queue_images_per_s": max(rows["queue_concurrent_1img"]["images_per_s"],
                                  rows["queue_concurrent_4img"]["images_per_s"]),
        "queue_requests_per_s": rows["queue_concurrent_1img"]["requests_per_s"],
        "p50_beyond_batching_wait_ms": seq - args.max_wait_ms,
        "p50_beyond_inprocess_and_wait_ms": seq - args.max_wait_ms - inproc,
        "targets": {"images_per_s": 150, "p50_beyond_wait_ms": 15},
    }
    report = {"benchmark": "queue_overhead", "date": now_utc(), "machine": machine(),
              "engine": "synthetic (zero cost)", "config": vars(args) | {"out": str(args.out)},
              "rows": rows, "summary": summary}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))

    print(f"\nQueue-path overhead, synthetic zero-cost engine, {machine()['cpus']} CPUs, {now_utc()}")
    print(f"{'row':28} {'req/s':>8} {'img/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'batch':>6}")
    for name, r in rows.items():
        lat = r["latency_ms"]
        print(f"{name:28} {r['requests_per_s']:8.1f} {r['images_per_s']:8.1f} {lat['p50']:8.1f} "
              f"{lat['p99']:8.1f} {r.get('mean_batch_images', r.get('batch_requests', 0)):6.1f}")
    print(f"\nqueue path: {summary['queue_images_per_s']:.0f} images/s (target >= 150); "
          f"sequential p50 beyond the {args.max_wait_ms:.0f} ms batching wait: "
          f"{summary['p50_beyond_batching_wait_ms']:.1f} ms (target <= 15)")
    print(f"JSON: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
