"""GPU benchmark: diffusers, this engine and the whole service, side by side.

SD1.5 architecture with random weights, 512x512, 20 Euler steps, CFG 7.5, one card:

  a  diffusers StableDiffusionPipeline, fp16, eager: batch 1 and its best batch (4/8/16)
  b  the same pipeline with torch.compile of its UNet (default mode, channels_last)
  c  this engine in-process: batch 1..32 with the fast path (compile + CUDA graphs
     per bucket), and eager for reference; warm-up time; fast vs eager image difference
  d  the whole service on this machine: redis-server, the API (gunicorn), one
     `celery -A tasks worker` with the GPU preset. Closed loop (C clients) and open
     loop (Poisson arrivals): images/s (the closed loop's counted between the ends of
     completion bursts, ``bench.harness.burst_rate``; the plain window count beside
     it), latency percentiles, GPU busy share (NVML),
     peak GPU memory, worker warm-up; single requests on the idle service
  e  the same service with `imagegenx worker --gpus 0` and then `--gpus all`: scaling

    python -m bench.gpu_benchmark --parts a,b,c,d --out bench/results/gpu
    python -m bench.gpu_benchmark --parts e --out bench/results/gpu-x2
    python -m bench.gpu_benchmark --combine run1.json run2.json --out docs/benchmarks
    python -m bench.gpu_benchmark --device cpu --tiny --parts a,c,d --duration 5   # smoke run

Each run writes gpu_benchmark.json, gpu_benchmark.png and prints the table.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import requests

from bench.harness import (
    REPO, ResultCollector, closed_loop_rates, free_port, machine, now_utc, percentiles, process,
)

KEY = "gpu-bench-key"
PROMPT = "a photograph of an astronaut riding a horse, detailed, golden hour"
DIFFUSERS_BATCHES = (4, 8, 16)
TARGETS = {
    "service_images_per_s_per_gpu": 10.0,
    "service_vs_diffusers_best": 1.35,
    "single_request_engine_s": 0.30,
    "single_vs_diffusers_batch1": 1.9,
    "gpu_busy_share": 0.90,
    "two_gpu_scaling": 1.9,
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -- machine ---------------------------------------------------------------------

def gpu_list() -> list[dict[str, str]]:
    """Cards as nvidia-smi names them (no CUDA context is created)."""
    binary = shutil.which("nvidia-smi")
    if binary is None:
        return []
    try:
        out = subprocess.run(
            [binary, "--query-gpu=index,name,uuid,memory.total,driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    keys = ("index", "name", "uuid", "memory_total", "driver")
    return [dict(zip(keys, (p.strip() for p in line.split(",")))) for line in out.strip().splitlines()]


def software() -> dict[str, str]:
    import diffusers
    import torch

    return {"torch": torch.__version__, "cuda": str(torch.version.cuda), "diffusers": diffusers.__version__}


class GpuSampler:
    """Samples GPU utilisation and memory with NVML every ``interval`` seconds."""

    def __init__(self, indices: list[int], interval: float = 0.1) -> None:
        self.indices = indices
        self.interval = interval
        self.samples: list[tuple[float, list[int], list[float]]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
            self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in indices]
        except Exception:  # noqa: BLE001 - no NVML (CPU machine): no GPU figures
            self._nvml = None
            self._handles = []

    @property
    def available(self) -> bool:
        return self._nvml is not None

    def start(self) -> "GpuSampler":
        if self.available:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        nv = self._nvml
        while not self._stop.is_set():
            t = time.perf_counter()
            util = [nv.nvmlDeviceGetUtilizationRates(h).gpu for h in self._handles]
            mem = [nv.nvmlDeviceGetMemoryInfo(h).used / 2**20 for h in self._handles]
            self.samples.append((t, util, mem))
            time.sleep(self.interval)

    def window(self, t0: float, t1: float) -> dict[str, Any] | None:
        rows = [s for s in self.samples if t0 <= s[0] <= t1]
        if not rows:
            return None
        per_gpu = list(zip(*[r[1] for r in rows]))
        mems = list(zip(*[r[2] for r in rows]))
        return {"gpu_busy_share": [statistics.fmean(u) / 100 for u in per_gpu],
                "peak_memory_mib": [max(m) for m in mems], "samples": len(rows)}


# -- model -----------------------------------------------------------------------

def ensure_model(path: Path, tiny: bool) -> Path:
    from imagegenx.engine.model_init import write_sd15_model, write_tiny_model
    from imagegenx.engine.quiet import silence_library_progress

    silence_library_progress()
    if (path / "model_index.json").is_file():
        return path
    t0 = time.perf_counter()
    if tiny:
        write_tiny_model(path)
    else:
        write_sd15_model(path)
    log(f"wrote {'tiny' if tiny else 'SD1.5'} model to {path} in {time.perf_counter() - t0:.1f} s")
    return path


def sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


# -- a, b: diffusers -------------------------------------------------------------

def load_pipe(model: Path, device: str, dtype: str) -> Any:
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    torch_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    pipe = StableDiffusionPipeline.from_pretrained(
        str(model), torch_dtype=torch_dtype, safety_checker=None, requires_safety_checker=False,
        local_files_only=True)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.tokenizer.model_max_length = 77
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def time_pipe(pipe: Any, batch: int, args: argparse.Namespace, runs: int) -> dict[str, Any]:
    counter = [0]

    def once() -> float:
        prompts = [f"{PROMPT} {counter[0]}-{k}" for k in range(batch)]
        counter[0] += 1
        sync(args.device)
        t0 = time.perf_counter()
        images = pipe(prompts, height=args.size, width=args.size, num_inference_steps=args.steps,
                      guidance_scale=args.guidance, output_type="pil").images
        sync(args.device)
        assert len(images) == batch
        return time.perf_counter() - t0

    first = once()
    times = [once() for _ in range(runs)]
    latency = statistics.median(times)
    return {"batch": batch, "latency_s": latency, "images_per_s": batch / latency, "runs_s": times,
            "first_call_s": first}


def part_a(model: Path, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    pipe = load_pipe(model, args.device, args.dtype)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    rows = []
    for b in (1, *args.diffusers_batches):
        r = time_pipe(pipe, b, args, args.runs)
        rows.append(r)
        log(f"a diffusers eager batch {b}: {r['latency_s']:.3f} s, {r['images_per_s']:.2f} img/s")
    best = max(rows[1:] or rows, key=lambda r: r["images_per_s"])
    out = {"rows": rows, "batch1_latency_s": rows[0]["latency_s"], "best_batch": best["batch"],
           "best_images_per_s": best["images_per_s"]}
    if args.device == "cuda":
        out["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    del pipe
    torch.cuda.empty_cache() if args.device == "cuda" else None
    return out


def part_b(model: Path, args: argparse.Namespace, best_batch: int) -> dict[str, Any]:
    import torch

    pipe = load_pipe(model, args.device, args.dtype)
    pipe.unet.to(memory_format=torch.channels_last)
    pipe.unet = torch.compile(pipe.unet, dynamic=False)
    rows = []
    for b in (1, best_batch):
        r = time_pipe(pipe, b, args, args.runs)
        r["compile_s"] = r["first_call_s"] - r["latency_s"]
        rows.append(r)
        log(f"b diffusers compiled batch {b}: {r['latency_s']:.3f} s, {r['images_per_s']:.2f} img/s "
            f"(compile {r['compile_s']:.0f} s)")
    del pipe
    torch.cuda.empty_cache() if args.device == "cuda" else None
    return {"mode": "torch.compile default mode, dynamic=False, channels_last", "rows": rows,
            "batch1_latency_s": rows[0]["latency_s"], "best_batch": best_batch,
            "best_images_per_s": rows[-1]["images_per_s"],
            "compile_s": sum(r["compile_s"] for r in rows)}


# -- c: this engine in-process --------------------------------------------------

def part_c(model: Path, args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np
    import torch

    from imagegenx.engine.base import BatchSpec, Sample
    from imagegenx.engine.diffusion import DiffusionEngine
    from imagegenx.engine.fastpath import FastPathOptions

    fast = None
    if args.device == "cuda":
        fast = FastPathOptions(compile=not args.no_compile, cuda_graphs=not args.no_cuda_graphs,
                               buckets=tuple(args.buckets))
    t0 = time.perf_counter()
    engine = DiffusionEngine.load(model, device=args.device, dtype=args.dtype, fast_path=fast)
    load_s = time.perf_counter() - t0
    report = engine.warmup()
    warmup_s = float(report.get("warmup_s", 0.0))
    log(f"c engine loaded in {load_s:.1f} s, warm-up {warmup_s:.1f} s")
    counter = [0]

    def spec(batch: int, seed0: int | None = None) -> BatchSpec:
        counter[0] += 1
        samples = tuple(Sample(f"{PROMPT} {counter[0]}-{k}", seed=(seed0 if seed0 is not None else counter[0] * 100) + k,
                               guidance_scale=args.guidance) for k in range(batch))
        return BatchSpec(args.size, args.size, args.steps, "euler", samples)

    def measure(batch: int) -> dict[str, Any]:
        def once() -> float:
            s = spec(batch)
            sync(args.device)
            t = time.perf_counter()
            images = engine.generate(s)
            sync(args.device)
            assert all(im is not None for im in images)
            return time.perf_counter() - t

        first = once()
        times = [once() for _ in range(args.runs)]
        latency = statistics.median(times)
        return {"batch": batch, "latency_s": latency, "images_per_s": batch / latency, "runs_s": times,
                "first_call_s": first}

    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    rows_fast = []
    for b in args.buckets:
        r = measure(b)
        rows_fast.append(r)
        log(f"c engine fast batch {b}: {r['latency_s']:.3f} s, {r['images_per_s']:.2f} img/s")
    peak = torch.cuda.max_memory_allocated() / 2**30 if args.device == "cuda" else None

    # The same seed through the fast path and the eager modules.
    def pixels(images: list[Any]) -> np.ndarray:
        return np.stack([np.asarray(im, dtype=np.int16) for im in images])

    diff = None
    rows_eager = []
    if engine.fast_options is not None:
        probe = spec(4, seed0=4242)
        fast_images = pixels(engine.generate(probe))
        engine.fast_path_enabled = False
        eager_images = pixels(engine.generate(probe))
        d = np.abs(fast_images - eager_images)
        diff = {"batch": 4, "mean_abs_levels": float(d.mean()), "p99_abs_levels": float(np.percentile(d, 99)),
                "max_abs_levels": int(d.max())}
        log(f"c fast vs eager (uint8 levels): mean {diff['mean_abs_levels']:.3f}, "
            f"p99 {diff['p99_abs_levels']:.1f}, max {diff['max_abs_levels']}")
    else:
        engine.fast_path_enabled = False
    for b in args.eager_batches:
        r = measure(b)
        rows_eager.append(r)
        log(f"c engine eager batch {b}: {r['latency_s']:.3f} s, {r['images_per_s']:.2f} img/s")
    best = max(rows_fast, key=lambda r: r["images_per_s"])
    out = {"rows_fast": rows_fast, "rows_eager": rows_eager, "load_s": load_s, "warmup_s": warmup_s,
           "warmup": report, "batch1_latency_s": rows_fast[0]["latency_s"], "best_batch": best["batch"],
           "best_images_per_s": best["images_per_s"], "peak_memory_gib": peak,
           "fast_vs_eager": diff, "fast_path": engine.fast_options is not None}
    del engine
    torch.cuda.empty_cache() if args.device == "cuda" else None
    return out


# -- d, e: the whole service -------------------------------------------------------

def proc(cmd: list[str], env: dict[str, str], logfile: Path):  # type: ignore[no-untyped-def]
    """A service process for parts d and e (a GPU worker gets 60 s to shut down warm)."""
    return process(cmd, env, logfile, grace_s=60.0)


def wait_text(logfile: Path, text: str, count: int, p: subprocess.Popen[bytes], timeout: float) -> float:
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        body = logfile.read_text(errors="replace") if logfile.exists() else ""
        if body.count(text) >= count:
            return time.perf_counter() - t0
        if p.poll() is not None:
            raise RuntimeError(f"{p.args!r} exited ({p.returncode}):\n{body[-4000:]}")
        time.sleep(0.2)
    body = logfile.read_text(errors="replace") if logfile.exists() else ""
    raise TimeoutError(f"{text!r} x{count} not seen in {timeout:.0f} s:\n{body[-4000:]}")


def warmups_from_log(logfile: Path) -> list[dict[str, float]]:
    pat = re.compile(r"ready in ([\d.]+) s \(load ([\d.]+) s, warm-up ([\d.]+) s")
    return [{"ready_s": float(a), "load_s": float(b), "warmup_s": float(c)}
            for a, b, c in pat.findall(logfile.read_text(errors="replace"))]


def redis_binary(explicit: str | None) -> str:
    binary = explicit or shutil.which("redis-server")
    if not binary:
        raise SystemExit("redis-server not found (give --redis-server PATH)")
    return binary


@contextmanager
def service(args: argparse.Namespace, model: Path, tmp: Path) -> Iterator[dict[str, Any]]:
    """Redis and the API (gunicorn); yields what clients and workers need."""
    import redis as redis_py

    rport, aport = free_port(), free_port()
    url = f"redis://127.0.0.1:{rport}/0"
    base = f"http://127.0.0.1:{aport}"
    env = {
        "IMAGEGENX_BROKER_URL": url, "IMAGEGENX_RESULT_BACKEND": url, "IMAGEGENX_QUEUE": "gpu-bench",
        "IMAGEGENX_STORAGE_ROOT": str(tmp / "images"), "IMAGEGENX_API_KEYS": KEY,
        "IMAGEGENX_PUBLIC_URL": base, "IMAGEGENX_MODEL": str(model), "IMAGEGENX_MODEL_NAME": "sd15-bench",
        "IMAGEGENX_ENGINE": "diffusion", "IMAGEGENX_MAX_BATCH": str(args.max_batch),
        "IMAGEGENX_MAX_NUM_IMAGES": str(min(4, args.max_batch)), "IMAGEGENX_PROGRESS_INTERVAL_S": "1",
        "IMAGEGENX_DEVICE": args.device, "IMAGEGENX_DTYPE": args.dtype,
        "IMAGEGENX_COMPILE": str(not args.no_compile).lower(),
        "IMAGEGENX_CUDA_GRAPHS": str(not args.no_cuda_graphs).lower(),
        "IMAGEGENX_BATCH_BUCKETS": ",".join(map(str, args.buckets)),
        "IMAGEGENX_MIN_SIZE": str(min(64, args.size)),
        # The load generator is one API key at hundreds of submissions a minute.
        "IMAGEGENX_RATE_LIMIT": "", "IMAGEGENX_STATUS_RATE_LIMIT": "", "IMAGEGENX_MAX_QUEUE_DEPTH": "0",
        "IMAGEGENX_COST_BUDGET_PER_MINUTE": "0", "IMAGEGENX_MAX_REQUEST_COST": "0",
        # Guidance on every step unless the benchmark names an interval (``--guidance-interval``),
        # as in the figures recorded so far (CFG 7.5 throughout); bench.guidance_speed names each
        # request's interval itself.
        "IMAGEGENX_GUIDANCE_INTERVAL": ",".join(f"{x:g}" for x in getattr(args, "guidance_interval", (0, 1))),
        # Benchmarks measure the engine: the load generators reuse prompts and seeds (each
        # policy or phase counts from 1), which the result cache would answer without drawing.
        "IMAGEGENX_RESULT_CACHE": "false",
    }
    if not args.tiny:
        env["IMAGEGENX_CONFIG"] = str(REPO / "configs" / "sd15-gpu.yaml")
    redis_cmd = [redis_binary(args.redis_server), "--bind", "127.0.0.1", "--port", str(rport), "--save", "",
                 "--appendonly", "no"]
    api_cmd = [sys.executable, "-m", "gunicorn", "--worker-class", "gthread", "--workers", "2", "--threads", "16",
               "--bind", f"127.0.0.1:{aport}", "imagegenx.api:create_app()"]
    with proc(redis_cmd, {}, tmp / "redis.log"):
        for _ in range(100):
            try:
                if redis_py.Redis.from_url(url).ping():
                    break
            except redis_py.RedisError:
                time.sleep(0.05)
        with proc(api_cmd, env, tmp / "api.log") as api:
            for _ in range(600):
                try:
                    socket.create_connection(("127.0.0.1", aport), timeout=0.5).close()
                    break
                except OSError:
                    if api.poll() is not None:
                        raise RuntimeError((tmp / "api.log").read_text()[-3000:]) from None
                    time.sleep(0.1)
            collector = ResultCollector(url).start()
            try:
                yield {"env": env, "base": base, "url": url, "collector": collector}
            finally:
                collector.stop()


def body(i: int, args: argparse.Namespace) -> dict[str, Any]:
    return {"prompt": f"{PROMPT} {i}", "seed": i, "steps": args.steps, "guidance_scale": args.guidance,
            "width": args.size, "height": args.size, "sampler": "euler", "num_images": 1}


class Load:
    """Submits over HTTP and collects completions (submit time, end time, meta)."""

    def __init__(self, svc: dict[str, Any], args: argparse.Namespace) -> None:
        self.base = svc["base"]
        self.collector: ResultCollector = svc["collector"]
        self.args = args
        self.counter = 0
        self.lock = threading.Lock()
        self.records: list[tuple[float, float, dict[str, Any]]] = []
        self.errors: list[str] = []
        self.local = threading.local()

    def _session(self) -> requests.Session:
        s = getattr(self.local, "s", None)
        if s is None:
            s = self.local.s = requests.Session()
        return s

    def submit(self) -> threading.Event | None:
        posted = self.post()
        return None if posted is None else posted[1]

    def post(self, **overrides: Any) -> tuple[str, threading.Event] | None:
        """POST one request (``body`` with ``overrides``): its task id and the event the
        collector sets when it finishes; None (error recorded) when it was not accepted."""
        with self.lock:
            self.counter += 1
            i = self.counter
        t0 = time.perf_counter()
        try:
            r = self._session().post(f"{self.base}/api/v1/images", json={**body(i, self.args), **overrides},
                                     headers={"X-API-Key": KEY}, timeout=30)
        except requests.RequestException as exc:
            self.errors.append(repr(exc))
            return None
        if r.status_code != 202:
            self.errors.append(f"{r.status_code} {r.text[:200]}")
            return None
        task_id = r.json()["task_id"]
        return task_id, self.collector.watch(task_id, t0)

    def harvest(self) -> None:
        with self.collector.lock:
            done = list(self.collector.done.values())
            self.collector.done.clear()
        self.records.extend(done)


def summarise(records: list[tuple[float, float, dict[str, Any]]], t0: float, t1: float,
              sampler: GpuSampler | None, errors: list[str]) -> dict[str, Any]:
    ok = [r for r in records if r[2].get("status") == "SUCCESS"]
    in_window = [r for r in ok if t0 <= r[1] <= t1]
    measured = [r for r in ok if r[0] >= t0]
    lat = [r[1] - r[0] for r in measured]
    engine = [r[2]["result"]["timings"]["engine_s"] for r in measured]
    sizes = [r[2]["result"]["batch"]["size"] for r in measured]
    out = {"seconds": t1 - t0, "images": len(in_window), "images_per_s": len(in_window) / (t1 - t0),
           "latency_s": percentiles(lat), "engine_s": percentiles(engine),
           "mean_batch_images": statistics.fmean(sizes) if sizes else 0.0,
           "failed": len(records) - len(ok) + len(errors), "errors": errors[:5]}
    if sampler is not None:
        out["gpu"] = sampler.window(t0, t1)
    return out


def closed_loop(svc: dict[str, Any], args: argparse.Namespace, clients: int, duration: float,
                sampler: GpuSampler | None) -> dict[str, Any]:
    load = Load(svc, args)
    start = time.perf_counter()
    stop_at = start + args.settle + duration

    def client() -> None:
        while time.perf_counter() < stop_at:
            ev = load.submit()
            if ev is not None and not ev.wait(300):
                load.errors.append("timeout")

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    load.harvest()
    out = summarise(load.records, start + args.settle, stop_at, sampler, load.errors)
    # Whole batches finish at once: count between burst ends, not in a fixed window.
    finishes = [r[1] for r in load.records if r[2].get("status") == "SUCCESS"]
    out.update(closed_loop_rates(finishes, start + args.settle, stop_at))
    out["clients"] = clients
    return out


def open_loop(svc: dict[str, Any], args: argparse.Namespace, rate: float, duration: float,
              sampler: GpuSampler | None) -> dict[str, Any]:
    load = Load(svc, args)
    rng = random.Random(7)
    start = time.perf_counter()
    events: list[threading.Event] = []
    with ThreadPoolExecutor(32) as pool:
        futures = []
        t = start
        while t < start + duration:
            t += rng.expovariate(rate)
            delay = t - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            futures.append(pool.submit(load.submit))
        for f in futures:
            ev = f.result()
            if ev is not None:
                events.append(ev)
    end_submit = time.perf_counter()
    for ev in events:
        ev.wait(max(1.0, 300 - (time.perf_counter() - end_submit)))
    load.harvest()
    # Throughput from the first arrival to the last completion; latency over every request sent.
    ok = [r for r in load.records if r[2].get("status") == "SUCCESS"]
    last = max((r[1] for r in ok), default=end_submit)
    out = summarise(load.records, start, last, sampler, load.errors)
    out["latency_s"] = percentiles([r[1] - r[0] for r in ok])
    out["offered_rate_per_s"] = rate
    out["sent"] = len(futures)
    out["completed"] = len(ok)
    return out


def idle_singles(svc: dict[str, Any], args: argparse.Namespace, n: int) -> dict[str, Any]:
    load = Load(svc, args)
    for _ in range(n):
        ev = load.submit()
        if ev is not None:
            ev.wait(120)
        time.sleep(0.2)
    load.harvest()
    ok = [r for r in load.records if r[2].get("status") == "SUCCESS"]
    return {"requests": len(ok), "latency_s": percentiles([r[1] - r[0] for r in ok]),
            "engine_s": percentiles([r[2]["result"]["timings"]["engine_s"] for r in ok]),
            "failed": n - len(ok)}


def part_d(model: Path, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    from bench.harness import celery_worker_cmd

    indices = [0] if args.device == "cuda" else []
    with service(args, model, tmp) as svc:
        sampler = GpuSampler(indices).start() if indices else None
        wlog = tmp / "worker-d.log"
        t0 = time.perf_counter()
        with proc(celery_worker_cmd(hostname="gpu0@%h"), svc["env"], wlog) as w:
            wait_text(wlog, " ready.", 1, w, args.worker_timeout)
            start_s = time.perf_counter() - t0
            warm = warmups_from_log(wlog)
            log(f"d worker ready in {start_s:.1f} s: {warm}")
            singles = idle_singles(svc, args, args.singles)
            log(f"d idle single requests: engine p50 {singles['engine_s']['p50']:.3f} s, "
                f"end-to-end p50 {singles['latency_s']['p50']:.3f} s")
            clients = args.clients or 2 * args.max_batch
            closed = closed_loop(svc, args, clients, args.duration, sampler)
            log(f"d closed loop ({clients} clients): {closed['images_per_s']:.2f} img/s, "
                f"p50 {closed['latency_s']['p50']:.2f} s, batch {closed['mean_batch_images']:.1f}, "
                f"gpu {closed.get('gpu')}")
            rate = args.open_rate or max(0.5, 0.8 * closed["images_per_s"])
            opened = open_loop(svc, args, rate, args.duration, sampler)
            log(f"d open loop ({rate:.2f}/s offered): {opened['images_per_s']:.2f} img/s, "
                f"p50 {opened['latency_s']['p50']:.2f} s, p99 {opened['latency_s']['p99']:.2f} s")
        if sampler is not None:
            sampler.stop()
        shutil.copy(wlog, args.out / "worker-d.log")
    return {"worker_start_s": start_s, "worker_warmup": warm, "max_batch": args.max_batch,
            "idle_single": singles, "closed_loop": closed, "open_loop": opened}


def part_e(model: Path, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    gpus = gpu_list()
    runs: dict[str, Any] = {}
    with service(args, model, tmp) as svc:
        for spec in ("0", "all"):
            n = 1 if spec == "0" else max(1, len(gpus))
            sampler = GpuSampler(list(range(n))).start() if gpus else None
            wlog = tmp / f"worker-e-{spec}.log"
            cmd = [sys.executable, "-m", "imagegenx.cli", "worker", "--gpus", spec]
            t0 = time.perf_counter()
            with proc(cmd, svc["env"], wlog) as w:
                wait_text(wlog, " ready.", n, w, args.worker_timeout)
                start_s = time.perf_counter() - t0
                warm = warmups_from_log(wlog)
                log(f"e --gpus {spec}: {n} worker(s) ready in {start_s:.1f} s: {warm}")
                clients = args.clients * n if args.clients else 2 * args.max_batch * n
                closed = closed_loop(svc, args, clients, args.duration, sampler)
                log(f"e --gpus {spec} closed loop ({clients} clients): {closed['images_per_s']:.2f} img/s, "
                    f"p50 {closed['latency_s']['p50']:.2f} s, gpu {closed.get('gpu')}")
            if sampler is not None:
                sampler.stop()
            shutil.copy(wlog, args.out / f"worker-e-{spec}.log")
            runs[spec] = {"gpus": n, "worker_start_s": start_s, "worker_warmup": warm, "closed_loop": closed}
    one, all_ = runs["0"]["closed_loop"]["images_per_s"], runs["all"]["closed_loop"]["images_per_s"]
    return {"runs": runs, "gpus": runs["all"]["gpus"], "scaling": all_ / one if one else None}


# -- report ----------------------------------------------------------------------

def ratios(parts: dict[str, Any]) -> dict[str, Any]:
    a, c, d, e = (parts.get(k) for k in "acde")
    s: dict[str, Any] = {"targets": TARGETS}
    if d:
        closed = d["closed_loop"]
        s["service_images_per_s_per_gpu"] = closed["images_per_s"]
        gpu = closed.get("gpu")
        s["gpu_busy_share"] = gpu["gpu_busy_share"][0] if gpu else None
        s["single_request_engine_s"] = d["idle_single"]["engine_s"]["p50"]
        s["single_request_end_to_end_s"] = d["idle_single"]["latency_s"]["p50"]
    if a and d:
        s["service_vs_diffusers_best"] = d["closed_loop"]["images_per_s"] / a["best_images_per_s"]
        s["single_vs_diffusers_batch1"] = a["batch1_latency_s"] / d["idle_single"]["engine_s"]["p50"]
    if a and c:
        s["engine_best_vs_diffusers_best"] = c["best_images_per_s"] / a["best_images_per_s"]
        s["engine_batch1_vs_diffusers_batch1"] = a["batch1_latency_s"] / c["batch1_latency_s"]
    if parts.get("b") and c:
        b = parts["b"]
        s["engine_best_vs_diffusers_compiled_best"] = c["best_images_per_s"] / b["best_images_per_s"]
        s["engine_batch1_vs_diffusers_compiled_batch1"] = b["batch1_latency_s"] / c["batch1_latency_s"]
    if e:
        s["two_gpu_scaling"] = e["scaling"]
    return s


def table(report: dict[str, Any]) -> str:
    parts = report["parts"]
    lines = [f"{'row':44} {'batch':>5} {'latency s':>10} {'img/s':>8}"]

    def row(name: str, batch: Any, lat: float | None, ips: float | None) -> None:
        lat_s = f"{lat:10.3f}" if lat is not None else f"{'':>10}"
        ips_s = f"{ips:8.2f}" if ips is not None else f"{'':>8}"
        lines.append(f"{name:44} {batch!s:>5} {lat_s} {ips_s}")

    for key, label in (("a", "a diffusers fp16 eager"), ("b", "b diffusers + torch.compile")):
        for r in (parts.get(key) or {}).get("rows", []):
            row(label, r["batch"], r["latency_s"], r["images_per_s"])
    c = parts.get("c")
    if c:
        for r in c["rows_fast"]:
            row("c engine, fast path" if c["fast_path"] else "c engine (no fast path)", r["batch"],
                r["latency_s"], r["images_per_s"])
        for r in c["rows_eager"]:
            row("c engine, eager", r["batch"], r["latency_s"], r["images_per_s"])
    d = parts.get("d")
    if d:
        cl, op, si = d["closed_loop"], d["open_loop"], d["idle_single"]
        row(f"d service, idle single request (engine)", 1, si["engine_s"]["p50"], None)
        row(f"d service, idle single request (end to end)", 1, si["latency_s"]["p50"], None)
        row(f"d service, closed loop {cl['clients']} clients (p50)", f"{cl['mean_batch_images']:.0f}",
            cl["latency_s"]["p50"], cl["images_per_s"])
        row(f"d service, open loop {op['offered_rate_per_s']:.1f}/s (p50)", f"{op['mean_batch_images']:.0f}",
            op["latency_s"]["p50"], op["images_per_s"])
    e = parts.get("e")
    if e:
        for spec, r in e["runs"].items():
            cl = r["closed_loop"]
            row(f"e service, --gpus {spec} ({r['gpus']} GPU) closed loop", f"{cl['mean_batch_images']:.0f}",
                cl["latency_s"]["p50"], cl["images_per_s"])
    s = report["summary"]
    lines.append("")
    for k, v in s.items():
        if k == "targets":
            continue
        target = TARGETS.get(k)
        val = f"{v:.3f}" if isinstance(v, float) else str(v)
        lines.append(f"{k:44} {val:>10}" + (f"   (target {'<=' if k.endswith('_s') else '>='} {target})"
                                           if target is not None else ""))
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib missing: no plot")
        return
    parts = report["parts"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4), dpi=80)
    for key, rows_key, label, style in (("a", "rows", "diffusers eager", "o-"),
                                        ("b", "rows", "diffusers compiled", "s--"),
                                        ("c", "rows_fast", "engine fast path", "^-"),
                                        ("c", "rows_eager", "engine eager", "v:")):
        rows = (parts.get(key) or {}).get(rows_key) or []
        if rows:
            left.plot([r["batch"] for r in rows], [r["images_per_s"] for r in rows], style, label=label)
    left.set_xscale("log", base=2)
    left.set_xlabel("batch (images)")
    left.set_ylabel("images/s")
    left.set_title("in-process, 512x512, 20 steps")
    left.legend(fontsize=7)
    left.grid(alpha=0.3)
    names, values = [], []
    if parts.get("a"):
        names.append("diffusers\nbest batch")
        values.append(parts["a"]["best_images_per_s"])
    if parts.get("d"):
        names += ["service\nclosed", "service\nopen"]
        values += [parts["d"]["closed_loop"]["images_per_s"], parts["d"]["open_loop"]["images_per_s"]]
    if parts.get("e"):
        for spec, r in parts["e"]["runs"].items():
            names.append(f"service\n{r['gpus']} GPU")
            values.append(r["closed_loop"]["images_per_s"])
    if names:
        right.bar(names, values, color="tab:blue")
        right.set_ylabel("images/s")
        right.set_title("whole service vs diffusers")
        right.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def finish(report: dict[str, Any], out: Path) -> None:
    report["summary"] = ratios(report["parts"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_benchmark.json").write_text(json.dumps(report, indent=2, default=str))
    plot(report, out / "gpu_benchmark.png")
    print()
    print(f"GPU benchmark, {report['date']}, cards: {report.get('cards')}")
    print(table(report))
    print(f"\nJSON: {out / 'gpu_benchmark.json'}")


def combine(files: list[Path], out: Path) -> None:
    report: dict[str, Any] = {"benchmark": "gpu_benchmark", "parts": {}, "runs": []}
    for f in files:
        r = json.loads(f.read_text())
        for k, v in r["parts"].items():
            v.setdefault("cards", r.get("cards"))
            report["parts"][k] = v
        report["runs"].append({k: r.get(k) for k in ("date", "cards", "software", "config", "machine")}
                              | {"parts": sorted(r["parts"])})
    last = json.loads(files[-1].read_text())
    report["date"] = last.get("date")
    report["cards"] = sorted({c["name"] for run in report["runs"] for c in (run["cards"] or [])})
    finish(report, out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="a,b,c,d", help="comma-separated parts to run: a,b,c,d,e")
    ap.add_argument("--out", type=Path, default=Path("bench/results/gpu"))
    ap.add_argument("--model", type=Path, default=None, help="model folder (written if missing)")
    ap.add_argument("--tiny", action="store_true", help="the tiny model (smoke runs)")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--dtype", default="fp16", choices=["fp16", "bf16", "fp32"])
    ap.add_argument("--size", type=int, default=None, help="image side (default: 512, tiny 64)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--runs", type=int, default=3, help="timed runs per in-process row (median)")
    ap.add_argument("--buckets", default="1,2,4,8,16,32")
    ap.add_argument("--eager-batches", default="1,8,16")
    ap.add_argument("--diffusers-batches", default="4,8,16")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--no-cuda-graphs", action="store_true")
    ap.add_argument("--max-batch", type=int, default=32, help="the service's max_batch")
    ap.add_argument("--clients", type=int, default=0, help="closed-loop clients per GPU (0: 2 x max batch)")
    ap.add_argument("--open-rate", type=float, default=0.0, help="Poisson rate (0: 0.8 x closed loop)")
    ap.add_argument("--duration", type=float, default=45.0, help="seconds per load phase")
    ap.add_argument("--settle", type=float, default=8.0, help="closed-loop seconds not counted")
    ap.add_argument("--singles", type=int, default=8)
    ap.add_argument("--worker-timeout", type=float, default=480.0)
    ap.add_argument("--redis-server", default=None)
    ap.add_argument("--combine", nargs="+", type=Path, help="merge earlier JSON files instead of running")
    args = ap.parse_args(argv)
    if args.combine:
        combine(args.combine, args.out)
        return 0
    args.parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    args.buckets = [int(b) for b in args.buckets.split(",")]
    args.eager_batches = [int(b) for b in args.eager_batches.split(",") if b]
    args.diffusers_batches = [int(b) for b in args.diffusers_batches.split(",") if b]
    args.size = args.size or (64 if args.tiny else 512)
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model = args.model or Path(tempfile.gettempdir()) / ("imagegenx-tiny" if args.tiny else "imagegenx-sd15")
    report: dict[str, Any] = {
        "benchmark": "gpu_benchmark", "date": now_utc(), "machine": machine(), "cards": gpu_list(),
        "software": software(), "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "parts": {},
    }
    log(f"cards: {report['cards']}; software: {report['software']}")
    ensure_model(model, args.tiny)
    parts = report["parts"]
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for part in args.parts:
            t0 = time.perf_counter()
            try:
                if part == "a":
                    parts["a"] = part_a(model, args)
                elif part == "b":
                    best = parts["a"]["best_batch"] if "a" in parts else max(args.diffusers_batches)
                    parts["b"] = part_b(model, args, best)
                elif part == "c":
                    parts["c"] = part_c(model, args)
                elif part == "d":
                    parts["d"] = part_d(model, args, tmp)
                elif part == "e":
                    parts["e"] = part_e(model, args, tmp)
                else:
                    raise SystemExit(f"unknown part {part!r}")
            except Exception as exc:  # noqa: BLE001 - keep the other parts' figures
                log(f"part {part} failed: {type(exc).__name__}: {exc}")
                report.setdefault("failed_parts", {})[part] = f"{type(exc).__name__}: {exc}"[-3000:]
            log(f"part {part} took {time.perf_counter() - t0:.0f} s")
            (args.out / "gpu_benchmark.partial.json").write_text(json.dumps(report, indent=2, default=str))
    finish(report, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
