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
    python -m bench.guidance_speed --simulate --out docs/benchmarks   # simulated clock, seconds
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
from bench.scheduler_compare import (Client, add_service_args, arrivals, closed_loop, engine_stats, log, open_loop,
                                     resolve_service_args)

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


def simulate(cost_name: str, max_batch: int, requests: int, seed: int = 80) -> dict[str, Any]:
    """The worker's StepScheduler with UNet-row accounting on a simulated clock.

    Time comes from the synthetic cost model (per UNet call of n UNet rows, and
    per decoded image) instead of a GPU, so the result shows what the row
    accounting can save where the host CPU is no bottleneck: saturation is a
    backlog of ``requests`` one-image requests at t = 0; 0.8 load is seeded
    Poisson arrivals at 0.8 x the [0,1] saturation rate.
    """
    import numpy as np

    from bench.scheduler_sim import Req, run_step_policy
    from imagegenx.engine.synthetic import COST_MODELS
    from imagegenx.step_scheduler import StepScheduler

    cost = COST_MODELS[cost_name]

    def run(times: list[float], interval: tuple[float, float]) -> dict[str, Any]:
        reqs = [Req(str(k), 20, t, interval) for k, t in enumerate(times)]
        calls = run_step_policy(reqs, cost, lambda: StepScheduler(2 * max_batch, 0.05, step_cost=cost.rows_s))
        images_total, rows_total = (sum(c) for c in zip(*calls, strict=True))
        lat = np.array([r.finished - r.arrived for r in reqs])
        return {"images_per_s": len(reqs) / max(r.finished for r in reqs),
                "p50_s": float(np.percentile(lat, 50)), "p99_s": float(np.percentile(lat, 99)),
                "images_per_call": images_total / len(calls), "unet_rows_per_call": rows_total / len(calls)}

    out: dict[str, Any] = {"cost_model": cost_name, "max_batch": max_batch, "requests": requests}
    base: float | None = None
    for interval in INTERVALS:
        sat = run([0.0] * requests, interval)
        base = base if base is not None else sat["images_per_s"]
        t = 0.0
        rng = np.random.default_rng(seed)
        times = []
        for _ in range(requests):
            t += float(rng.exponential(1.0 / (LOAD * base)))
            times.append(t)
        out[name(interval)] = {"saturation": sat, "load_0.8": run(times, interval),
                               "speedup_vs_full": sat["images_per_s"] / base}
    return out


def simulated_table(sim: dict[str, Any]) -> str:
    lines = [f"simulated clock, cost model {sim['cost_model']}, max_batch {sim['max_batch']}:",
             "| interval | sat. images/s | vs [0,1] | images/call | UNet rows/call | 0.8 load p50 s | p99 s |",
             "|---|---|---|---|---|---|---|"]
    for key in (name(i) for i in INTERVALS):
        s, o = sim[key]["saturation"], sim[key]["load_0.8"]
        lines.append(f"| {key} | {s['images_per_s']:.2f} | {sim[key]['speedup_vs_full']:.2f}x | "
                     f"{s['images_per_call']:.1f} | {s['unet_rows_per_call']:.1f} | {o['p50_s']:.3f} | "
                     f"{o['p99_s']:.3f} |")
    return "\n".join(lines)


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
    add_service_args(ap)
    ap.add_argument("--out", type=Path, default=Path("bench/results/guidance"))
    ap.add_argument("--duration", type=float, default=15.0, help="seconds of arrivals at 0.8 load")
    ap.add_argument("--saturation-s", type=float, default=15.0, help="seconds of each closed loop")
    ap.add_argument("--settle-s", type=float, default=4.0, help="closed-loop ramp-up left out")
    ap.add_argument("--pause-s", type=float, default=2.0, help="idle time between runs")
    ap.add_argument("--simulate", action="store_true",
                    help="only the simulated clock (no service): StepScheduler + the synthetic cost model")
    ap.add_argument("--sim-requests", type=int, default=2000)
    args = ap.parse_args(argv)
    if args.simulate:
        args.out.mkdir(parents=True, exist_ok=True)
        sim = simulate(args.synthetic_cost, args.max_batch, args.sim_requests)
        sim.update(date=now_utc(), machine=machine(),
                   command=" ".join(["python -m bench.guidance_speed", *(argv if argv is not None else sys.argv[1:])]))
        path = args.out / "guidance_speed_simulated.json"
        path.write_text(json.dumps(sim, indent=2) + "\n")
        print(simulated_table(sim))
        log(f"wrote {path}")
        return 0
    model = resolve_service_args(args)
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
