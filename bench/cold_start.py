"""Worker time-to-ready on a machine with empty compile caches, with and without
the compiled artifact of ``imagegenx optimize warmup``, in one command.

Phases (JSON written to ``--out`` after each):

1. ``build``: ``imagegenx optimize warmup --out ARTIFACT`` with empty local
   caches (this is also a cold in-process compile);
2. ``cold_with_artifact``: a real worker (``celery -A tasks worker``) with
   ``IMAGEGENX_COMPILE_CACHE=ARTIFACT`` and empty local caches
   (``TORCHINDUCTOR_CACHE_DIR`` and ``TRITON_CACHE_DIR`` point at fresh folders);
3. ``cold_cache_only``: as phase 2 with a copy of the artifact that leaves out
   its precompiled UNet (the worker traces the UNet on the cache's hits): what
   the precompiled UNet saves, in the same run;
4. ``warm_local``: a worker without the artifact, on the local caches phase 2
   left behind (a restart on the same machine);
5. ``cold_no_artifact``: a worker without the artifact and empty local caches
   (today's cold start; ``--skip-cold`` leaves it out).

Time to ready is from starting the process to Celery's `` ready.`` line (the
worker loads the model and prepares the fast path before it). Writes the
SD1.5-architecture model with random weights when ``--model`` holds none
(``--tiny``: the tiny model). On a GPU (H200: the cold compile alone is about
two minutes)::

    python -m bench.cold_start --model var/models/sd15 --out bench/results/cold_start

A CPU smoke test (the engine compiles nothing on the CPU, so this checks the
wiring, not the speed)::

    python -m bench.cold_start --tiny --device cpu --no-cuda-graphs --model var/models/tiny \\
        --out bench/results/cold_start_cpu
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.gpu_benchmark import proc, redis_binary, wait_text, warmups_from_log
from bench.harness import REPO, celery_worker_cmd, free_port, machine, now_utc

TARGET_READY_S = 20.0
PHASES = ("build", "cold_with_artifact", "cold_cache_only", "warm_local", "cold_no_artifact")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def ensure_model(path: Path, tiny: bool) -> float:
    """Write the model if ``path`` holds none; seconds it took (0 when present)."""
    if (path / "model_index.json").is_file():
        return 0.0
    from imagegenx.engine.model_init import write_sd15_model, write_tiny_model

    t0 = time.perf_counter()
    log(f"writing the {'tiny' if tiny else 'SD1.5-architecture'} model (random weights) to {path}")
    (write_tiny_model if tiny else write_sd15_model)(path)
    return time.perf_counter() - t0


def fresh_caches(root: Path, name: str) -> dict[str, str]:
    """Environment pointing Inductor's and Triton's caches at new empty folders."""
    inductor = root / f"inductor-{name}"
    inductor.mkdir(parents=True)
    return {"TORCHINDUCTOR_CACHE_DIR": str(inductor), "TRITON_CACHE_DIR": str(inductor / "triton")}


def without_precompiled_unet(artifact: Path, dest: Path) -> Path:
    """A copy of ``artifact`` holding the compile cache alone (no precompiled UNet)."""
    from imagegenx.compile_manifest import MANIFEST_FILE, PRECOMPILED_UNET_FILE

    shutil.copytree(artifact, dest, ignore=shutil.ignore_patterns(PRECOMPILED_UNET_FILE))
    manifest = json.loads((dest / MANIFEST_FILE).read_text())
    manifest.update(precompiled_unet=None, precompiled_unet_bytes=0)
    (dest / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    return dest


def log_facts(text: str) -> dict[str, Any]:
    """What the worker log says about the compile cache and the compiles."""
    facts: dict[str, Any] = {}
    if m := re.search(r"compile cache \S+ loaded in ([\d.]+) s", text):
        facts["compile_cache"] = "loaded"
        facts["compile_cache_load_s"] = float(m.group(1))
    elif m := re.search(r"compile cache \S+ refused \((.*)\); compiling", text):
        facts["compile_cache"] = "refused: " + m.group(1)
    elif "compile cache" in text and "compiles nothing" in text:
        facts["compile_cache"] = "not used: compiles nothing"
    if m := re.search(r"UNet ([\d.]+) s, VAE ([\d.]+) s; (\d+) graphs compiled", text):
        facts.update(unet_s=float(m.group(1)), vae_s=float(m.group(2)), compiled_graphs=int(m.group(3)))
    if m := re.search(r"UNet precompiled (True|False)", text):
        facts["unet_precompiled"] = m.group(1) == "True"
    if m := re.search(r"precompiled UNet loaded in ([\d.]+) s", text):
        facts["precompiled_unet_load_s"] = float(m.group(1))
    elif m := re.search(r"precompiled UNet \S+ not loaded \((.*)\); tracing it", text):
        facts["precompiled_unet_error"] = m.group(1)
    if m := re.search(r"UNet not precompiled \((.*)\); workers", text):
        facts["precompile_error"] = m.group(1)
    return facts


def start_worker(name: str, env: dict[str, str], tmp: Path, args: argparse.Namespace) -> dict[str, Any]:
    wlog = tmp / f"worker-{name}.log"
    t0 = time.perf_counter()
    with proc(celery_worker_cmd(hostname=f"{name}@%h"), env, wlog) as w:
        wait_text(wlog, " ready.", 1, w, args.worker_timeout)
        ready_s = time.perf_counter() - t0
    text = wlog.read_text(errors="replace")
    (args.out / f"cold_start_worker_{name}.log").write_text(text[-20000:])
    warm = warmups_from_log(wlog)
    return {"ready_s": ready_s, **(warm[0] if warm else {}), **log_facts(text)}


def build_artifact(env: dict[str, str], artifact: Path, tmp: Path, args: argparse.Namespace) -> dict[str, Any]:
    blog = tmp / "build.log"
    t0 = time.perf_counter()
    with proc([sys.executable, "-m", "imagegenx.cli", "optimize", "warmup", "--out", str(artifact)], env,
              blog) as p:
        rc = p.wait(args.worker_timeout)
    text = blog.read_text(errors="replace")
    (args.out / "cold_start_build.log").write_text(text[-20000:])
    if rc != 0:
        raise SystemExit(f"optimize warmup failed ({rc}):\n{text[-4000:]}")
    manifest = json.loads((artifact / "manifest.json").read_text())
    out: dict[str, Any] = {"seconds": time.perf_counter() - t0, "manifest": manifest,
                           "artifact_mb": manifest.get("artifact_bytes", 0) / 1e6, **log_facts(text)}
    if m := re.search(r"(\d+) graphs compiled", text):
        out["compiled_graphs"] = int(m.group(1))
    return out


def table(report: dict[str, Any]) -> str:
    lines = ["| phase | ready s | load s | warm-up s | UNet s | VAE s | graphs compiled | UNet precompiled | "
             "compile cache |", "|---|---|---|---|---|---|---|---|---|"]

    def num(v: Any) -> str:
        return f"{v:.1f}" if isinstance(v, (int, float)) else "-"

    b = report.get("build")
    if b:
        unet_mb = b["manifest"].get("precompiled_unet_bytes", 0) / 1e6
        lines.append(f"| build (optimize warmup) | {num(b['seconds'])} | | | | | {b.get('compiled_graphs', '-')} | "
                     f"{f'{unet_mb:.1f} MB' if unet_mb else b.get('precompile_error', 'no')} | "
                     f"wrote {b['artifact_mb']:.1f} MB |")
    for phase in PHASES[1:]:
        r = report.get(phase)
        if r:
            lines.append(f"| {phase} | {num(r['ready_s'])} | {num(r.get('load_s'))} | {num(r.get('warmup_s'))} | "
                         f"{num(r.get('unet_s'))} | {num(r.get('vae_s'))} | {r.get('compiled_graphs', '-')} | "
                         f"{'yes' if r.get('unet_precompiled') else r.get('precompiled_unet_error', 'no')} | "
                         f"{r.get('compile_cache', '-')} |")
    r = report.get("cold_with_artifact")
    if r and r.get("compile_cache") == "loaded":
        verdict = "met" if r["ready_s"] <= TARGET_READY_S else "missed"
        lines.append(f"\ntarget: ready in at most {TARGET_READY_S:.0f} s with the artifact: {verdict} "
                     f"({r['ready_s']:.1f} s)")
    elif r:
        lines.append(f"\ntarget not measured: the artifact was not loaded ({r.get('compile_cache', '-')})")
    c = report.get("cold_cache_only")
    if r and c and r.get("unet_precompiled"):
        lines.append(f"precompiled UNet: ready in {r['ready_s']:.1f} s against {c['ready_s']:.1f} s with the "
                     f"compile cache alone ({r['ready_s'] / c['ready_s']:.2f}x)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=Path("var/models/sd15"),
                    help="model folder; written (random weights) when it holds no model")
    ap.add_argument("--tiny", action="store_true", help="write the tiny model instead of SD1.5 (CPU smoke test)")
    ap.add_argument("--out", type=Path, default=Path("bench/results/cold_start"))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default=None, help="default fp16 on cuda, fp32 on cpu")
    ap.add_argument("--buckets", default="1,2,4,8,16,32")
    ap.add_argument("--no-cuda-graphs", action="store_true")
    ap.add_argument("--skip-cold", action="store_true", help="leave out the cold worker without the artifact")
    ap.add_argument("--worker-timeout", type=float, default=400.0)
    ap.add_argument("--redis-server", default=None, help="redis-server binary (default: on PATH)")
    args = ap.parse_args(argv)
    args.dtype = args.dtype or ("fp16" if args.device == "cuda" else "fp32")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "cold_start.json"
    report: dict[str, Any] = {"date": now_utc(), "machine": machine(),
                              "command": " ".join(["python -m bench.cold_start", *(argv or sys.argv[1:])]),
                              "device": args.device, "dtype": args.dtype, "buckets": args.buckets,
                              "target_ready_s": TARGET_READY_S}

    def save() -> None:
        path.write_text(json.dumps(report, indent=2) + "\n")

    model = args.model.resolve()
    report["model_write_s"] = ensure_model(model, args.tiny)
    save()
    with tempfile.TemporaryDirectory(prefix="imagegenx-cold-start-") as tmp_name:
        tmp = Path(tmp_name)
        rport = free_port()
        url = f"redis://127.0.0.1:{rport}/0"
        env = {
            "IMAGEGENX_BROKER_URL": url, "IMAGEGENX_RESULT_BACKEND": url, "IMAGEGENX_QUEUE": "cold-start",
            "IMAGEGENX_STORAGE_ROOT": str(tmp / "images"), "IMAGEGENX_MODEL": str(model),
            "IMAGEGENX_ENGINE": "diffusion", "IMAGEGENX_DEVICE": args.device, "IMAGEGENX_DTYPE": args.dtype,
            "IMAGEGENX_COMPILE": "true", "IMAGEGENX_CUDA_GRAPHS": str(not args.no_cuda_graphs).lower(),
            "IMAGEGENX_BATCH_BUCKETS": args.buckets, "IMAGEGENX_COMPILE_CACHE": "",
            "IMAGEGENX_WORKER_METRICS_PORT": str(free_port()),
        }
        if not args.tiny:
            env["IMAGEGENX_CONFIG"] = str(REPO / "configs" / "sd15-gpu.yaml")
        artifact = tmp / "artifact"
        redis_cmd = [redis_binary(args.redis_server), "--bind", "127.0.0.1", "--port", str(rport), "--save", "",
                     "--appendonly", "no"]
        with proc(redis_cmd, {}, tmp / "redis.log"):
            time.sleep(0.5)
            log("build: imagegenx optimize warmup, empty local caches")
            report["build"] = build_artifact({**env, **fresh_caches(tmp, "build")}, artifact, tmp, args)
            save()
            log(f"build: {report['build']['seconds']:.1f} s, {report['build']['artifact_mb']:.1f} MB")

            with_artifact = fresh_caches(tmp, "with-artifact")
            log("cold_with_artifact: worker with IMAGEGENX_COMPILE_CACHE, empty local caches")
            report["cold_with_artifact"] = start_worker(
                "with-artifact", {**env, **with_artifact, "IMAGEGENX_COMPILE_CACHE": str(artifact)}, tmp, args)
            save()
            log(f"cold_with_artifact: ready in {report['cold_with_artifact']['ready_s']:.1f} s")

            if report["build"]["manifest"].get("precompiled_unet"):
                cache_only = without_precompiled_unet(artifact, tmp / "artifact-cache-only")
                log("cold_cache_only: worker with the compile cache alone, empty local caches")
                report["cold_cache_only"] = start_worker(
                    "cache-only", {**env, **fresh_caches(tmp, "cache-only"), "IMAGEGENX_COMPILE_CACHE": str(cache_only)},
                    tmp, args)
                save()
                log(f"cold_cache_only: ready in {report['cold_cache_only']['ready_s']:.1f} s")

            log("warm_local: worker without the artifact, on the local caches just filled")
            report["warm_local"] = start_worker("warm-local", {**env, **with_artifact}, tmp, args)
            save()
            log(f"warm_local: ready in {report['warm_local']['ready_s']:.1f} s")

            if not args.skip_cold:
                log("cold_no_artifact: worker without the artifact, empty local caches")
                report["cold_no_artifact"] = start_worker("cold", {**env, **fresh_caches(tmp, "cold")}, tmp, args)
                save()
                log(f"cold_no_artifact: ready in {report['cold_no_artifact']['ready_s']:.1f} s")
    save()
    print(table(report))
    log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
