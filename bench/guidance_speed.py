"""Speed of guidance intervals: the whole service, one worker, every interval in one run.

Starts redis-server, the API (gunicorn) and one ``celery -A tasks worker`` with the
step scheduler, once: the interval is a request field, so one warm worker serves
every interval. For each of [0,1], [0,0.6], [0,0.4], [0.1,0.6] (20 steps, CFG
7.5) it measures

- saturation: a closed loop of 2 x max_batch clients; images/s counted after a
  ramp-up;
- 0.8 load: seeded Poisson arrivals at 0.8 of the *[0,1]* saturation rate (the
  same arrivals for every interval, so latencies compare at the same traffic);

and reports images/s, p50/p99 end to end, and per UNet call both the images and
the UNet rows it ran (two per guided image, one per other image). Engines:
``--engine synthetic`` (CPU; sleeps per UNet row as ``--synthetic-cost`` says) or
``--engine diffusion`` (a GPU with the SD1.5 preset). About 8 minutes on a GPU
with the defaults (worker start and compile included)::

    python -m bench.guidance_speed --engine synthetic --out docs/benchmarks
    python -m bench.guidance_speed --engine diffusion --model DIR --redis-server PATH --out OUT
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from celery import Celery

from bench.gpu_benchmark import GpuSampler, proc, service, wait_text, warmups_from_log
from bench.harness import celery_worker_cmd, machine, now_utc
from bench.scheduler_compare import Client, arrivals, closed_loop, engine_stats, log, open_loop

INTERVALS: tuple[tuple[float, float], ...] = ((0.0, 1.0), (0.0, 0.6), (0.0, 0.4), (0.1, 0.6))
LOAD = 0.8
# The speed target of a cheaper default: at least this many times the images/s of [0,1].
MIN_SPEEDUP = 1.3


class IntervalClient(Client):
    """Submits with the current ``interval`` as the request's guidance_interval."""

    interval: tuple[float, float] = (0.0, 1.0)

    def submit(self, steps: int) -> tuple[str, int] | None:  # type: ignore[override]
        posted = self.post(steps=steps, guidance_interval=list(self.interval))
        return None if posted is None else (posted[0], steps)


def model_rows_per_call(before: dict[str, Any], after: dict[str, Any]) -> float | None:
    """Mean UNet rows per UNet call between two reads of the worker's statistics."""
    calls = after.get("unet_calls", 0) - before.get("unet_calls", 0)
    rows = after.get("unet_model_rows", 0) - before.get("unet_model_rows", 0)
    return rows / calls if calls else None


def name(interval: tuple[float, float]) -> str:
    return f"[{interval[0]:g},{interval[1]:g}]"


def measure(client: IntervalClient, app: Celery, args: argparse.Namespace,
            sampler: GpuSampler | None, report: dict[str, Any], save: Any) -> None:
    sat_rate: float | None = None
    for interval in INTERVALS:
        client.interval = interval
        r: dict[str, Any] = {"interval": list(interval)}
        before = engine_stats(app)
        r["saturation"] = closed_loop(client, 2 * args.max_batch, args.saturation_s, args.settle_s, app, sampler)
        r["saturation"]["unet_rows_per_call"] = model_rows_per_call(before, engine_stats(app))
        sat_rate = sat_rate if sat_rate is not None else r["saturation"]["images_per_s"]
        time.sleep(args.pause_s)  # the closed loop's last requests drain
        before = engine_stats(app)
        schedule = arrivals(LOAD * sat_rate, args.duration, (20,), seed=80)
        r["load_0.8"] = open_loop(client, schedule, app, sampler)
        r["load_0.8"]["unet_rows_per_call"] = model_rows_per_call(before, engine_stats(app))
        r["load_0.8"]["offered_of_full_saturation"] = LOAD
        report["intervals"][name(interval)] = r
        save()
        s, o = r["saturation"], r["load_0.8"]
        log(f"{name(interval)}: saturation {s['images_per_s']:.2f} img/s, images/call {s['rows_per_call']}, "
            f"UNet rows/call {s['unet_rows_per_call']}; 0.8 load p50 {o['latency_s'].get('p50', 0):.2f} s "
            f"p99 {o['latency_s'].get('p99', 0):.2f} s")
        time.sleep(args.pause_s)


def table(report: dict[str, Any]) -> str:
    lines = ["| interval | sat. images/s | vs [0,1] | images/call | UNet rows/call | 0.8 load images/s | "
             "p50 s | p99 s | UNet rows/call |", "|---|---|---|---|---|---|---|---|---|"]
    base = report["intervals"][name(INTERVALS[0])]["saturation"]["images_per_s"]
    for key, r in report["intervals"].items():
        s, o = r["saturation"], r["load_0.8"]

        def f(x: Any, fmt: str = ".1f") -> str:
            return "-" if x is None else format(x, fmt)

        lines.append(f"| {key} | {s['images_per_s']:.2f} | {s['images_per_s'] / max(1e-9, base):.2f}x | "
                     f"{f(s['rows_per_call'])} | {f(s['unet_rows_per_call'])} | {o['images_per_s']:.2f} | "
                     f"{o['latency_s'].get('p50', 0):.3f} | {o['latency_s'].get('p99', 0):.3f} | "
                     f"{f(o['unet_rows_per_call'])} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engine", choices=["synthetic", "diffusion"], default="synthetic")
    ap.add_argument("--model", type=Path, default=None, help="diffusion: SD1.5 model folder")
    ap.add_argument("--synthetic-cost", default="sd15-h200-graphs",
                    help="synthetic engine's cost model (imagegenx.engine.synthetic.COST_MODELS)")
    ap.add_argument("--out", type=Path, default=Path("bench/results/guidance"))
    ap.add_argument("--duration", type=float, default=15.0, help="seconds of arrivals at 0.8 load")
    ap.add_argument("--saturation-s", type=float, default=15.0, help="seconds of each closed loop")
    ap.add_argument("--settle-s", type=float, default=4.0, help="closed-loop ramp-up left out")
    ap.add_argument("--pause-s", type=float, default=2.0, help="idle time between runs")
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--size", type=int, default=None, help="image side (default 512; synthetic 64)")
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="fp16")
    ap.add_argument("--buckets", default="1,2,4,8,16,32")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--no-cuda-graphs", action="store_true")
    ap.add_argument("--worker-timeout", type=float, default=400.0)
    ap.add_argument("--redis-server", default=None)
    args = ap.parse_args(argv)
    args.steps = 20
    args.tiny = args.engine == "synthetic"
    args.size = args.size or (64 if args.tiny else 512)
    args.buckets = [int(b) for b in args.buckets.split(",")]
    if args.engine == "synthetic":
        args.device, args.dtype = "cpu", "fp32"
    args.out.mkdir(parents=True, exist_ok=True)
    model = args.model or Path("var/models/unused")
    report: dict[str, Any] = {
        "date": now_utc(), "machine": machine(), "engine": args.engine,
        "synthetic_cost": args.synthetic_cost if args.engine == "synthetic" else None,
        "command": " ".join(["python -m bench.guidance_speed", *(argv if argv is not None else sys.argv[1:])]),
        "scheduler": "step", "steps": 20, "guidance_scale": args.guidance, "max_batch": args.max_batch,
        "size": args.size, "load": f"{LOAD} x the [0,1] saturation rate, Poisson, {args.duration:g} s",
        "intervals": {}}
    path = args.out / f"guidance_speed_{args.engine}.json"

    def save() -> None:
        path.write_text(json.dumps(report, indent=2) + "\n")

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        with service(args, model, tmp) as svc:
            env = {**svc["env"], "IMAGEGENX_SCHEDULER": "step"}
            if args.engine == "synthetic":
                env.update(IMAGEGENX_ENGINE="synthetic", IMAGEGENX_SYNTHETIC_COST=args.synthetic_cost)
            app = Celery(broker=svc["url"], backend=svc["url"])
            sampler = GpuSampler([0]).start() if args.engine == "diffusion" else None
            wlog = tmp / "worker.log"
            t0 = time.perf_counter()
            with proc(celery_worker_cmd(hostname="guidance@%h"), env, wlog) as w:
                wait_text(wlog, " ready.", 1, w, args.worker_timeout)
                report["worker_start_s"] = time.perf_counter() - t0
                report["worker_warmup"] = warmups_from_log(wlog)
                measure(IntervalClient(svc, args), app, args, sampler, report, save)
            if sampler is not None:
                sampler.stop()
    base = report["intervals"][name(INTERVALS[0])]["saturation"]["images_per_s"]
    report["speedup_vs_full"] = {k: r["saturation"]["images_per_s"] / max(1e-9, base)
                                 for k, r in report["intervals"].items()}
    report["meets_speed_target"] = {k: v >= MIN_SPEEDUP for k, v in report["speedup_vs_full"].items()}
    save()
    print(table(report))
    log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
