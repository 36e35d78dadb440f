"""The two scheduling policies on a simulated clock, driven by a measured step cost.

The pure policies (``imagegenx.batching.BatchPolicy`` for the request
scheduler, ``imagegenx.step_scheduler.StepScheduler`` for the step scheduler)
run exactly as in the worker, but time comes from a cost table instead of a
GPU: the synthetic engine's ``sd15-h200-graphs`` cost model, the SD1.5 UNet
measured per padded bucket on one H200 with the fast path (``bench.step_profile``,
docs/benchmarks/step_profile_h200.json), and its VAE decode. Arrivals are seeded
Poisson processes, the same for every policy. It takes seconds, so policies can
be compared over thousands of requests; the whole-service benchmark
(``bench.scheduler_compare``) checks the result on the real service.

    python -m bench.scheduler_sim --out docs/benchmarks
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from imagegenx.batching import BatchPolicy
from imagegenx.engine.synthetic import COST_MODELS, CostModel
from imagegenx.guidance import FULL, Interval, parse_interval, reserved_rows, rows_at
from imagegenx.step_scheduler import StepScheduler

COST = COST_MODELS["sd15-h200-graphs"]
MIXED_STEPS = (10, 20, 25, 30, 50)
LOADS = (0.5, 0.8, 0.95)
GUIDANCE_SCALE = 7.5


@dataclass
class Req:
    id: str
    steps: int
    arrived: float
    interval: Interval = FULL
    done_steps: int = 0
    finished: float = 0.0

    @property
    def remaining(self) -> int:
        return self.steps - self.done_steps

    def rows(self) -> int:
        """UNet rows of this step: 2 inside the guidance interval, else 1."""
        return rows_at(GUIDANCE_SCALE, self.interval, self.done_steps, self.steps)

    def reserved(self) -> int:
        """Rows the step scheduler counts for it (the most any remaining step runs)."""
        return reserved_rows(GUIDANCE_SCALE, self.interval, self.done_steps, self.steps)


def poisson(rate: float, n: int, steps: tuple[int, ...], seed: int,
            interval: Interval = FULL) -> list[Req]:
    rng = random.Random(seed)
    t, out = 0.0, []
    for i in range(n):
        t += rng.expovariate(rate)
        out.append(Req(f"r{i}", rng.choice(steps), t, interval))
    return out


def interval_arg(text: str) -> Interval:
    """argparse type of ``--guidance-interval``: "start,end", with the reason when it is not one."""
    try:
        return parse_interval(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def loads_arg(text: str) -> tuple[float, ...]:
    """argparse type of ``--loads``: comma-separated fractions of saturation, each in (0, 1.5)."""
    try:
        loads = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not loads or any(not 0 < x < 1.5 for x in loads):
        raise argparse.ArgumentTypeError(f"each load must be between 0 and 1.5, got {text!r}")
    return loads


def batch_s(cost: CostModel, n: int, steps: int, interval: Interval) -> float:
    """One request-policy batch of ``n`` images: every step priced by its UNet rows, then the decode."""
    return (sum(cost.rows_s(n * rows_at(GUIDANCE_SCALE, interval, k, steps)) for k in range(steps))
            + cost.decode_s(n))


def run_request_policy(reqs: list[Req], cost: CostModel, max_batch: int, max_wait: float) -> None:
    policy: BatchPolicy[Req] = BatchPolicy(max_batch, max_wait)
    now, i = 0.0, 0
    while i < len(reqs) or len(policy):
        while i < len(reqs) and reqs[i].arrived <= now:
            policy.add(reqs[i], reqs[i].steps, reqs[i].arrived)
            i += 1
        batch = policy.take(now)
        if batch is None:
            nxt = [t for t in (policy.next_deadline(), reqs[i].arrived if i < len(reqs) else None)
                   if t is not None]
            now = max(now + 1e-9, min(nxt))
            continue
        items = batch.items
        now += batch_s(cost, len(items), items[0].steps, items[0].interval)
        for r in items:
            r.finished = now


def run_step_policy(reqs: list[Req], cost: CostModel,
                    make: Callable[[], StepScheduler[Req]]) -> list[tuple[int, int]]:
    """Run ``reqs`` through the step scheduler ``make()`` builds; (images, UNet rows) of each call."""
    sched = make()
    now, i = 0.0, 0
    calls: list[tuple[int, int]] = []
    while i < len(reqs) or len(sched):
        while i < len(reqs) and reqs[i].arrived <= now:
            r = reqs[i]
            sched.add(r, r.id, "g", r.reserved(), r.arrived, steps=r.steps, need=r.reserved)
            i += 1
        plan = sched.schedule(now)
        if plan.idle:
            nxt = [t for t in (plan.wake_at, reqs[i].arrived if i < len(reqs) else None) if t is not None]
            now = max(now + 1e-9, min(nxt))
            continue
        running = plan.running
        rows = sum(r.rows() for r in running)
        now += cost.rows_s(rows)
        calls.append((len(running), rows))
        done = []
        for r in running:
            r.done_steps += 1
            if r.remaining == 0:
                done.append(r)
        if done:
            now += cost.decode_s(len(done))
            for r in done:
                r.finished = now
            sched.finish(r.id for r in done)
    return calls


def summary(reqs: list[Req], warm: int) -> dict[str, Any]:
    measured = reqs[warm:]
    lat = np.array([r.finished - r.arrived for r in measured])
    out: dict[str, Any] = {"p50": float(np.percentile(lat, 50)), "p95": float(np.percentile(lat, 95)),
                           "p99": float(np.percentile(lat, 99)), "mean": float(lat.mean())}
    by_steps = {}
    for s in sorted({r.steps for r in measured}):
        x = np.array([r.finished - r.arrived for r in measured if r.steps == s])
        by_steps[str(s)] = {"p50": float(np.percentile(x, 50)), "p99": float(np.percentile(x, 99))}
    out["by_steps"] = by_steps
    span = max(r.finished for r in reqs) - reqs[0].arrived
    out["images_per_s"] = len(reqs) / span
    return out


def saturation(cost: CostModel, max_batch: int, steps: int = 20, interval: Interval = FULL) -> float:
    return max_batch / batch_s(cost, max_batch, steps, interval)


def policies(max_batch: int, max_wait: float) -> dict[str, Callable[[], StepScheduler[Req]]]:
    """The step policies compared; rows are UNet rows (two per guided image), as in the worker."""
    rows = 2 * max_batch
    return {
        "step (admit all, FIFO)": lambda: StepScheduler(rows, max_wait, order="fifo", min_gain=0.0),
        "step (shortest first, cost-aware rows)": lambda: StepScheduler(
            rows, max_wait, order="shortest", min_gain=0.05, step_cost=COST.rows_s),
        "step (arrival order, cost-aware rows)": lambda: StepScheduler(
            rows, max_wait, order="fifo", min_gain=0.05, step_cost=COST.rows_s),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--max-wait-ms", type=float, default=50.0)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--guidance-interval", type=interval_arg, default=FULL,
                    help="every request's guidance interval (0,1: every step; the service's default is 0,0.4)")
    ap.add_argument("--loads", type=loads_arg, default=LOADS,
                    help="comma-separated fractions of the request policy's saturation")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    loads = args.loads
    interval = start, end = args.guidance_interval
    cost = COST
    sat = saturation(cost, args.max_batch, interval=interval)
    mean_mixed = statistics.fmean(MIXED_STEPS)
    report: dict[str, Any] = {"cost_model": "sd15-h200-graphs", "saturation_images_per_s": sat,
                              "guidance_interval": list(interval),
                              "requests": args.requests, "runs": {}}
    names = ["request"] + list(policies(args.max_batch, args.max_wait_ms / 1000))
    print(f"saturation (request policy, full batches of {args.max_batch}, 20 steps): {sat:.2f} images/s")
    print("| arrivals | load | policy | images/s | p50 s | p95 s | p99 s | mean rows per call |")
    print("|---|---|---|---|---|---|---|---|")
    for mix, steps in (("fixed 20", (20,)), ("mixed", MIXED_STEPS)):
        for load in loads:
            rate = load * sat * (20.0 / mean_mixed if mix == "mixed" else 1.0)
            for name in names:
                reqs = poisson(rate, args.requests, steps, args.seed, interval)
                rows: list[int] = []  # images per UNet call
                if name == "request":
                    run_request_policy(reqs, cost, args.max_batch, args.max_wait_ms / 1000)
                else:
                    calls = run_step_policy(reqs, cost, policies(args.max_batch, args.max_wait_ms / 1000)[name])
                    rows = [images for images, _ in calls]
                s = summary(reqs, warm=args.requests // 10)
                s["mean_rows_per_call"] = statistics.fmean(rows) if rows else None
                report["runs"][f"{mix}|{load}|{name}"] = s
                print(f"| {mix} | {load} | {name} | {s['images_per_s']:.2f} | {s['p50']:.3f} | "
                      f"{s['p95']:.3f} | {s['p99']:.3f} | "
                      f"{'-' if not rows else f'{statistics.fmean(rows):.1f}'} |")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        suffix = "" if interval == FULL else f"_interval_{start:g}_{end:g}"
        suffix += "" if loads == LOADS else "_loads_" + "_".join(f"{x:g}" for x in loads)
        (args.out / f"scheduler_sim{suffix}.json").write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
