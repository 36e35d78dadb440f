"""Step scheduler against request scheduler: the whole service, both policies in one run.

Starts redis-server and the API (gunicorn), then for each policy
(``IMAGEGENX_SCHEDULER=request``, then ``step``) one ``celery -A tasks worker``, and
measures on the same seeded arrivals:

- one request on an idle service (end to end and engine time);
- closed-loop saturation (2 x max_batch clients, 20 steps): images/s;
- open-loop Poisson arrivals at 0.5, 0.8 and 0.95 of the *request* policy's
  saturation rate, with steps fixed at 20 and mixed over {10, 20, 25, 30, 50}
  (mixed arrivals are scaled by 20 / mean steps, so the offered UNet work is the
  same fraction of capacity): images/s, p50/p95/p99 overall and per step count,
  mean image rows per UNet call (step) or images per batch (request), GPU busy.

``--saturation-only`` measures the idle single request and the closed loop of
each policy and no open-loop arrivals (a longer ``--saturation-s`` for a finer
saturation figure). The closed loop's images/s counts between the ends of
completion bursts, since the request policy finishes a whole batch at once.

A run too long for one command is measured one policy per command on the same
arrivals (``--policies request`` measures the saturation rate; ``--policies step
--saturation-rate R`` reuses it) and joined with ``--combine``::

    python -m bench.scheduler_compare --policies request --duration 300 --out A
    python -m bench.scheduler_compare --policies step --saturation-rate 14.0 --duration 300 --out B
    python -m bench.scheduler_compare --combine A/scheduler_compare_synthetic_request.json \
        B/scheduler_compare_synthetic_step.json --out C

Engines: ``--engine synthetic`` (CPU; sleeps as the ``sd15-h200`` cost model says:
13 + 3.3 n ms per step, 13 ms per decoded image) or ``--engine diffusion`` (a GPU
with the SD1.5 preset). Prints a table and writes JSON::

    python -m bench.scheduler_compare --engine synthetic --out docs/benchmarks
    python -m bench.scheduler_compare --engine diffusion --model var/models/sd15 --out OUT
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from collections.abc import Callable
from typing import Any

from celery import Celery

from bench.gpu_benchmark import GpuSampler, Load, proc, service, wait_text, warmups_from_log
from bench.harness import celery_worker_cmd, closed_loop_rates, machine, now_utc, percentiles
from bench.scheduler_sim import interval_arg, loads_arg

MIXED_STEPS = (10, 20, 25, 30, 50)
MIXES = {"fixed20": (20,), "mixed": MIXED_STEPS}
LOADS = (0.5, 0.8, 0.95)
POLICIES = ("request", "step")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def arrivals(rate: float, duration: float, steps: tuple[int, ...], seed: int) -> list[tuple[float, int]]:
    """(offset in seconds, steps) of a seeded Poisson process: the same for both policies."""
    rng = random.Random(seed)
    out, t = [], 0.0
    while True:
        t += rng.expovariate(rate)
        if t >= duration:
            return out
        out.append((t, rng.choice(steps)))


def mixes_arg(text: str) -> tuple[str, ...]:
    """``--mixes``: names among :data:`MIXES`."""
    mixes = tuple(x.strip() for x in text.split(","))
    unknown = [m for m in mixes if m not in MIXES]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown mix {', '.join(map(repr, unknown))}; "
                                         f"choose from {', '.join(MIXES)}")
    return mixes


class Client(Load):
    """Submits over HTTP with a chosen step count; finished tasks are read by id."""

    def submit(self, steps: int) -> tuple[str, int] | None:  # type: ignore[override]
        posted = self.post(steps=steps)
        return None if posted is None else (posted[0], steps)

    def wait(self, ids: list[tuple[str, int]], timeout: float) -> list[tuple[int, float, float, dict[str, Any]]]:
        """(steps, submitted, ended, meta) of each finished task."""
        deadline = time.perf_counter() + timeout
        out = []
        for task_id, steps in ids:
            while True:
                with self.collector.lock:
                    done = self.collector.done.pop(task_id, None)
                if done is not None:
                    out.append((steps, *done))
                    break
                if time.perf_counter() > deadline:
                    self.errors.append(f"timeout {task_id}")
                    break
                time.sleep(0.01)
        return out


def engine_stats(app: Celery) -> dict[str, Any]:
    replies = app.control.inspect(timeout=2.0).stats() or {}
    return next(iter(replies.values()), {}).get("batching", {}) if replies else {}


def rows_per_call(before: dict[str, Any], after: dict[str, Any]) -> float | None:
    """Mean image rows per UNet call (step) or images per batch (request) between two reads."""
    for rows, calls in (("unet_rows", "unet_calls"), ("images", "batches")):
        if after.get(calls):
            dc = after[calls] - before.get(calls, 0)
            if dc:
                if rows == "unet_rows":
                    total = sum(int(k) * v for k, v in after["rows_per_call_histogram"].items())
                    total -= sum(int(k) * v for k, v in before.get("rows_per_call_histogram", {}).items())
                    return total / dc
                return (after[rows] - before.get(rows, 0)) / dc
    return None


def summarise(done: list[tuple[int, float, float, dict[str, Any]]], t0: float, t1: float,
              errors: list[str], sampler: GpuSampler | None) -> dict[str, Any]:
    ok = [d for d in done if d[3].get("status") == "SUCCESS"]
    lat = [d[2] - d[1] for d in ok]
    per_steps: dict[str, Any] = {}
    for steps in sorted({d[0] for d in ok}):
        per_steps[str(steps)] = percentiles([d[2] - d[1] for d in ok if d[0] == steps])
    last = max((d[2] for d in ok), default=t1)
    out = {"requests": len(done), "succeeded": len(ok), "failed": len(done) - len(ok) + len(errors),
           "images_per_s": len(ok) / max(1e-9, last - t0), "latency_s": percentiles(lat) if lat else {},
           "latency_by_steps_s": per_steps, "breakdown_s": breakdown(ok), "errors": errors[:5]}
    if sampler is not None:
        out["gpu"] = sampler.window(t0, last)
    return out


def open_loop(client: Client, schedule: list[tuple[float, int]], app: Celery,
              sampler: GpuSampler | None) -> dict[str, Any]:
    before = engine_stats(app)
    ids: list[tuple[str, int]] = []
    start = time.perf_counter()
    with ThreadPoolExecutor(32) as pool:
        futures = []
        for offset, steps in schedule:
            delay = start + offset - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            futures.append(pool.submit(client.submit, steps))
        ids = [f.result() for f in futures if f.result() is not None]  # type: ignore[misc]
    done = client.wait(ids, timeout=300)
    out = summarise(done, start, time.perf_counter(), client.errors, sampler)
    out["offered_per_s"] = len(schedule) / max(1e-9, schedule[-1][0]) if schedule else 0.0
    out["rows_per_call"] = rows_per_call(before, engine_stats(app))
    client.errors.clear()
    return out


def closed_loop(client: Client, clients: int, duration: float, settle: float, app: Celery,
                sampler: GpuSampler | None) -> dict[str, Any]:
    """Saturation: ``clients`` submit one after another; images/s counts the
    completions after the first ``settle`` seconds (the first batches' ramp-up)."""
    before = engine_stats(app)
    stop_at = time.perf_counter() + duration
    records: list[tuple[int, float, float, dict[str, Any]]] = []
    lock = threading.Lock()

    def run() -> None:
        while time.perf_counter() < stop_at:
            sent = client.submit(20)
            if sent is None:
                continue
            got = client.wait([sent], timeout=300)
            with lock:
                records.extend(got)

    start = time.perf_counter()
    threads = [threading.Thread(target=run) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # Throughput counts completions inside the window only, between burst ends
    # (the request policy finishes whole batches at once).
    out = summarise(records, start, stop_at, client.errors, sampler)
    out.update(closed_loop_rates([r[2] for r in records], start + settle, stop_at))
    out["clients"] = clients
    out["rows_per_call"] = rows_per_call(before, engine_stats(app))
    client.errors.clear()
    return out


BREAKDOWN = ("queued_s", "engine_s", "postprocess_s", "rest_s")


def breakdown(ok: list[tuple[int, float, float, dict[str, Any]]]) -> dict[str, Any]:
    """Where the end-to-end time of succeeded requests goes: the worker's own
    timings (queued: its receipt to the engine; engine: admission to decoded
    images, shared calls included; postprocess: PNG and store), and the rest (HTTP
    submission, broker, result store and the client seeing the result)."""
    pairs = [(d[2] - d[1], d[3]["result"]["timings"]) for d in ok
             if (d[3].get("result") or {}).get("timings")]
    if not pairs:
        return {}
    rest = [lat - t["queued_s"] - t["engine_s"] - t["postprocess_s"] for lat, t in pairs]
    return {**{key: percentiles([t[key] for _, t in pairs]) for key in BREAKDOWN[:3]},
            "rest_s": percentiles(rest)}


def idle_singles(client: Client, n: int) -> dict[str, Any]:
    done = []
    for _ in range(n):
        sent = client.submit(20)
        if sent is not None:
            done += client.wait([sent], timeout=120)
        time.sleep(0.2)
    ok = [d for d in done if d[3].get("status") == "SUCCESS"]
    return {"requests": len(ok), "latency_s": percentiles([d[2] - d[1] for d in ok]), **breakdown(ok)}


def run_policy(policy: str, svc: dict[str, Any], args: argparse.Namespace, tmp: Path,
               sat_rate: float | None, out: dict[str, Any], save: Callable[[], None]) -> float:
    """Measure one policy into ``out`` (saved after every run); the saturation rate."""
    env = {**svc["env"], "IMAGEGENX_SCHEDULER": policy}
    if args.engine == "synthetic":
        env.update(IMAGEGENX_ENGINE="synthetic", IMAGEGENX_SYNTHETIC_COST=args.synthetic_cost)
    app = Celery(broker=svc["url"], backend=svc["url"])
    sampler = GpuSampler([0]).start() if args.engine == "diffusion" else None
    wlog = tmp / f"worker-{policy}.log"
    t0 = time.perf_counter()
    with proc(celery_worker_cmd(hostname=f"{policy}@%h"), env, wlog) as w:
        wait_text(wlog, " ready.", 1, w, args.worker_timeout)
        out["worker_start_s"] = time.perf_counter() - t0
        out["worker_warmup"] = warmups_from_log(wlog)
        client = Client(svc, args)
        out["idle_single"] = idle_singles(client, args.singles)
        save()
        log(f"{policy}: idle single p50 {out['idle_single']['latency_s'].get('p50', 0):.3f} s")
        closed = closed_loop(client, 2 * args.max_batch, args.saturation_s, args.settle_s, app, sampler)
        out["closed_loop"] = closed
        save()
        log(f"{policy}: closed loop {closed['images_per_s']:.4f} img/s, rows/call {closed['rows_per_call']}")
        rate = sat_rate if sat_rate is not None else closed["images_per_s"]
        mean_mixed = statistics.fmean(MIXED_STEPS)
        for mix in args.mixes:
            steps = MIXES[mix]
            for load in args.loads:
                scale = 1.0 if mix == "fixed20" else 20.0 / mean_mixed
                schedule = arrivals(load * rate * scale, args.duration, steps,
                                    seed=int(load * 100) + len(steps))
                r = open_loop(client, schedule, app, sampler)
                r["load"] = load
                out[f"open_{mix}_{load}"] = r
                save()  # a run cut short keeps what it measured
                lat = r["latency_s"]
                log(f"{policy}: {mix} load {load}: {r['images_per_s']:.2f} img/s, p50 {lat.get('p50', 0):.2f} s, "
                    f"p99 {lat.get('p99', 0):.2f} s, rows/call {r['rows_per_call']}")
    if sampler is not None:
        sampler.stop()
    (args.out / f"scheduler_compare_worker_{policy}.log").write_text(wlog.read_text(errors="replace")[-20000:])
    return rate


def policies_arg(text: str) -> tuple[str, ...]:
    """``--policies``: names among :data:`POLICIES`, measured in the order given."""
    names = tuple(x.strip() for x in text.split(","))
    unknown = [n for n in names if n not in POLICIES]
    if unknown or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"expected distinct policies among {', '.join(POLICIES)}, got {text!r}")
    return names


def positive_rate(text: str) -> float:
    """``--saturation-rate``: images/s, above zero."""
    try:
        rate = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected images per second, got {text!r}") from None
    if not rate > 0:
        raise argparse.ArgumentTypeError(f"must be above 0, got {text!r}")
    return rate


# What two single-policy reports must share to be one comparison: the same
# arrivals (rate, duration, loads, mixes) on the same service settings.
SAME_RUN_KEYS = ("engine", "loads", "mixes", "max_batch", "duration_s", "size", "guidance_interval",
                 "request_saturation_per_s")


def combine(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """One comparison from single-policy reports measured on the same arrivals;
    ValueError names what differs or is missing."""
    joined: dict[str, Any] = {}
    for r in reports:
        for policy in POLICIES:
            if policy in r:
                if policy in joined:
                    raise ValueError(f"two reports measure the {policy} policy")
                joined[policy] = r[policy]
    missing = [p for p in POLICIES if p not in joined]
    if missing:
        raise ValueError(f"no report measures the {' and '.join(missing)} policy")
    first = reports[0]
    for key in SAME_RUN_KEYS:
        values = [r.get(key) for r in reports]
        if key == "request_saturation_per_s" and _same_rate(values):
            continue
        if any(v != values[0] for v in values):
            raise ValueError(f"the reports differ in {key}: {values}; their arrivals are not the same")
    out = {k: first[k] for k in ("date", "machine", *SAME_RUN_KEYS) if k in first}
    out["request_saturation_per_s_given"] = [r.get("request_saturation_per_s") for r in reports]
    out["commands"] = [r.get("command") for r in reports]
    out["dates"] = [r.get("date") for r in reports]
    out.update(joined)
    out["ratios"] = ratios(out)
    return out


def _same_rate(values: list[Any]) -> bool:
    """Saturation rates that agree to the printed 2 decimals (a rate copied from a
    log into ``--saturation-rate``): the seeded arrivals are the same draws, their
    times scaled by the rates' ratio (at most 0.1%)."""
    if not all(isinstance(v, (int, float)) and v > 0 for v in values):
        return False
    return max(values) - min(values) <= 0.005 + 1e-9 and max(values) / min(values) <= 1.001


def ratios(report: dict[str, Any]) -> dict[str, Any]:
    """The issue's target ratios; a ratio whose runs (or policy) were left out is None."""
    if not all(p in report for p in POLICIES):
        return {}
    req, step = report["request"], report["step"]

    def p(run: dict[str, Any], key: str, q: str = "p50") -> float | None:
        return run[key]["latency_s"].get(q) if key in run else None

    def by_steps(run: dict[str, Any], steps: int) -> float | None:
        per = run.get("open_mixed_0.8", {}).get("latency_by_steps_s", {})
        return per.get(str(steps), {}).get("p50")

    def ratio(a: float | None, b: float | None) -> float | None:
        return None if a is None or not b else a / b

    return {
        "fixed20_0.8_p50_step_over_request": ratio(p(step, "open_fixed20_0.8"), p(req, "open_fixed20_0.8")),
        "fixed20_0.8_p99_step_over_request": ratio(p(step, "open_fixed20_0.8", "p99"),
                                                   p(req, "open_fixed20_0.8", "p99")),
        "mixed_0.8_p99_step_over_request": ratio(p(step, "open_mixed_0.8", "p99"), p(req, "open_mixed_0.8", "p99")),
        "mixed_0.8_step_p50_10_over_50": ratio(by_steps(step, 10), by_steps(step, 50)),
        "saturation_step_over_request": ratio(step["closed_loop"]["images_per_s"],
                                              req["closed_loop"]["images_per_s"]),
        "idle_single_step_s": step["idle_single"]["latency_s"].get("p50"),
    }


def table(report: dict[str, Any]) -> str:
    lines = ["| run | policy | images/s | p50 s | p95 s | p99 s | rows per call |",
             "|---|---|---|---|---|---|---|"]
    keys = ["closed_loop"] + [f"open_{m}_{load}" for m in MIXES for load in report.get("loads", LOADS)]
    measured = [p for p in POLICIES if p in report]
    for key in keys:
        for policy in measured:
            r = report[policy].get(key)
            if r is None:
                continue
            lat = r["latency_s"]
            rows = r["rows_per_call"]
            lines.append(f"| {key} | {policy} | {r['images_per_s']:.2f} | {lat.get('p50', 0):.3f} | "
                         f"{lat.get('p95', 0):.3f} | {lat.get('p99', 0):.3f} | "
                         f"{'-' if rows is None else f'{rows:.1f}'} |")
    for policy in measured:
        s = report[policy]["idle_single"]
        lines.append(f"| idle single | {policy} | | {s['latency_s'].get('p50', 0):.3f} | | | 1 |")
    lines.append("")
    if any("open_mixed_0.8" in report[p] for p in measured):
        lines.append("mixed steps at 0.8 load, p50 / p99 by step count (s):")
    for policy in measured:
        if "open_mixed_0.8" not in report[policy]:
            continue
        per = report[policy]["open_mixed_0.8"]["latency_by_steps_s"]
        lines.append(f"  {policy}: " + ", ".join(f"{k}: {v['p50']:.2f}/{v['p99']:.2f}" for k, v in per.items()))
    lines += ["", "where the time goes, p50 (s): queued / engine / postprocess / rest"]
    for key in ["idle_single"] + keys[1:]:
        for policy in measured:
            r = report[policy].get(key)
            split = (r or {}).get("breakdown_s", r if key == "idle_single" else None) or {}
            if all(k in split for k in BREAKDOWN):
                lines.append(f"  {key} {policy}: " + " / ".join(f"{split[k].get('p50', 0):.3f}" for k in BREAKDOWN))
    lines.append("")
    lines.append("ratios: " + json.dumps({k: (round(v, 3) if isinstance(v, float) else v)
                                          for k, v in report["ratios"].items()}))
    return "\n".join(lines)


def add_service_args(ap: argparse.ArgumentParser) -> None:
    """Options of the service under test, shared by the benchmarks that start one."""
    ap.add_argument("--engine", choices=["synthetic", "diffusion"], default="synthetic")
    ap.add_argument("--model", type=Path, default=None, help="diffusion: SD1.5 model folder")
    ap.add_argument("--synthetic-cost", default="sd15-h200-graphs",
                    help="synthetic engine's cost model (imagegenx.engine.synthetic.COST_MODELS)")
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


def resolve_service_args(args: argparse.Namespace) -> Path:
    """Derived options (20-step requests, the synthetic engine on the CPU at 64x64);
    makes ``args.out`` and returns the model folder the worker loads."""
    args.steps = 20  # requests' default steps (each run sets its own)
    args.tiny = args.engine == "synthetic"
    args.size = args.size or (64 if args.tiny else 512)
    args.buckets = [int(b) for b in args.buckets.split(",")]
    if args.engine == "synthetic":
        args.device, args.dtype = "cpu", "fp32"
    args.out.mkdir(parents=True, exist_ok=True)
    return args.model or Path("var/models/unused")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_service_args(ap)
    ap.add_argument("--out", type=Path, default=Path("bench/results/scheduler"))
    ap.add_argument("--duration", type=float, default=20.0, help="seconds of arrivals per open-loop run")
    ap.add_argument("--saturation-s", type=float, default=30.0, help="seconds of the closed loop")
    ap.add_argument("--settle-s", type=float, default=6.0, help="closed-loop ramp-up left out")
    ap.add_argument("--singles", type=int, default=5)
    ap.add_argument("--guidance-interval", type=interval_arg, default=(0.0, 1.0),
                    help="the server's default guidance interval for the requests (0,1: every step; "
                         "the service's own default is 0,0.4)")
    ap.add_argument("--loads", type=loads_arg, default=LOADS,
                    help="open-loop loads, fractions of the request policy's saturation (comma-separated)")
    ap.add_argument("--mixes", type=mixes_arg, default=tuple(MIXES),
                    help=f"open-loop step mixes (comma-separated, of {', '.join(MIXES)})")
    ap.add_argument("--policies", type=policies_arg, default=POLICIES,
                    help="policies to measure, in order (comma-separated, of request, step)")
    ap.add_argument("--saturation-rate", type=positive_rate, default=None,
                    help="the request policy's saturation (images/s) to offer loads of, instead of "
                         "measuring it first; needed when --policies leaves out request")
    ap.add_argument("--saturation-only", action="store_true",
                    help="measure the idle single request and the closed loop only (no open-loop arrivals)")
    ap.add_argument("--combine", nargs="+", type=Path, default=None, metavar="JSON",
                    help="join single-policy reports of the same arrivals into one comparison "
                         "(writes it under --out) and measure nothing")
    args = ap.parse_args(argv)
    if args.combine:
        return combine_files(args.combine, args.out)
    if args.saturation_only:  # no open-loop runs: no loads, mixes or arrivals
        args.loads, args.mixes, args.duration = (), (), 0.0
    if args.engine == "diffusion" and (args.model is None or not args.model.is_dir()):
        # The worker would otherwise fall back to the tiny model and measure that.
        ap.error(f"--model: no model folder at {args.model}; write the SD1.5 architecture with "
                 "python -c 'from pathlib import Path; from imagegenx.engine.model_init import "
                 "write_sd15_model; write_sd15_model(Path(\"var/models/sd15\"))'")
    if args.policies[0] != "request" and args.saturation_rate is None and args.loads:
        ap.error("--saturation-rate is needed unless --policies starts with request "
                 "(the loads are fractions of the request policy's saturation)")
    model = resolve_service_args(args)
    report: dict[str, Any] = {"date": now_utc(), "machine": machine(), "engine": args.engine,
                              "loads": list(args.loads), "mixes": list(args.mixes),
                              "command": " ".join(["python -m bench.scheduler_compare", *(argv or sys.argv[1:])]),
                              "max_batch": args.max_batch, "duration_s": args.duration, "size": args.size,
                              "guidance_interval": list(args.guidance_interval)}
    suffix = "" if tuple(args.policies) == POLICIES else "_" + "_".join(args.policies)
    path = args.out / f"scheduler_compare_{args.engine}{suffix}.json"
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        with service(args, model, tmp) as svc:
            sat = args.saturation_rate
            if sat is not None:
                report["request_saturation_per_s"] = sat

            def save() -> None:
                path.write_text(json.dumps(report, indent=2))

            for policy in args.policies:
                report[policy] = {}
                rate = run_policy(policy, svc, args, tmp, sat, report[policy], save)
                sat = rate if sat is None else sat
                report["request_saturation_per_s"] = sat
    report["ratios"] = ratios(report)
    path.write_text(json.dumps(report, indent=2))
    print(table(report))
    log(f"wrote {path}")
    return 0


def combine_files(paths: list[Path], out: Path) -> int:
    """``--combine``: the joined comparison's table, and its JSON under ``out``."""
    try:
        report = combine([json.loads(p.read_text()) for p in paths])
    except (OSError, ValueError, KeyError) as exc:
        print(f"--combine: {exc}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"scheduler_compare_{report.get('engine', 'unknown')}.json"
    path.write_text(json.dumps(report, indent=2))
    print(table(report))
    log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
