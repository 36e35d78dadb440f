"""What a fresh process spends to get the compiled UNet ready: Dynamo precompile
against the portable compile cache.

A worker started with the compile-cache artifact (section 11 of
docs/BENCHMARKS.md) still traces the UNet with Dynamo and captures every
bucket. PyTorch's precompile (``torch.compile(...).aot_compile``, saved with
``save_compiled_function`` and read with ``torch.compiler.load_compiled_function``)
stores the traced graph, its guards and the compiled code, so a fresh process
skips the tracing too. This bench compares the two on the fast path's UNet call
(fused QKV, channels_last, branch-free upsamplers, dynamic batch), each phase a
fresh process with empty Inductor and Triton caches:

- ``precompile-build``: ``aot_compile`` and save; ``precompile-load``: load, then
  warm and capture every row bucket (as ``BucketedCFGUNet.prepare`` does);
- ``cache-build``: compile, call, ``save_cache_artifacts``; ``cache-load``:
  ``load_cache_artifacts``, then compile (Dynamo traces) and capture every bucket.

Each load phase also checks its outputs against the eager UNet.

    python -m bench.precompile_unet --model var/models/sd15 --out bench/results/precompile_unet

Prints a table and writes ``precompile_unet.json`` to ``--out`` after each phase.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.harness import REPO, machine, now_utc

PHASES = ("precompile-build", "precompile-load", "cache-build", "cache-load")


def run_phase(phase: str, model: Path, artifact: Path, device: str, buckets: list[int]) -> dict[str, Any]:
    """One phase, in this process; returns its timings."""
    t0 = time.perf_counter()
    import torch
    from diffusers import UNet2DConditionModel

    from imagegenx.engine.fastpath import _as_unet_fn, _UNetSlot, example_rows, optimise_modules, unet_row_buckets
    from imagegenx.engine.precompile import compile_unet_call, load_unet_call, unet_call
    from imagegenx.engine.upsample import single_branch_upsamplers

    out: dict[str, Any] = {"phase": phase, "torch": torch.__version__, "imports_s": time.perf_counter() - t0}
    dtype = torch.float16 if device == "cuda" else torch.float32
    t = time.perf_counter()
    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet", torch_dtype=dtype).to(device).eval()
    optimise_modules(unet, fuse_qkv=True, channels_last=True)
    single_branch_upsamplers(unet)
    out["model_s"] = time.perf_counter() - t
    size = unet.config.sample_size
    sample_shape = (unet.config.in_channels, size, size)
    context_shape = (77, unet.config.cross_attention_dim)
    dev = torch.device(device)
    rows = unet_row_buckets(buckets)

    def example(b: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return example_rows(b, sample_shape, context_shape, device=dev, dtype=dtype)

    with torch.inference_mode():
        if phase == "precompile-build":
            t = time.perf_counter()
            compiled = compile_unet_call(unet, *example(4))
            out["compile_s"] = time.perf_counter() - t
            compiled.save_compiled_function(str(artifact))
            out["artifact_bytes"] = artifact.stat().st_size
            return finish(out, t0)
        if phase == "cache-build":
            t = time.perf_counter()
            fn = _traced(unet)
            fn(*example(4))
            torch.cuda.synchronize() if device == "cuda" else None
            out["compile_s"] = time.perf_counter() - t
            data, _ = torch.compiler.save_cache_artifacts()
            artifact.write_bytes(data)
            out["artifact_bytes"] = len(data)
            return finish(out, t0)
        t = time.perf_counter()
        if phase == "precompile-load":
            call = load_unet_call(artifact, unet)
        else:
            torch.compiler.load_cache_artifacts(artifact.read_bytes())
            call = _traced(unet)
        out["artifact_load_s"] = time.perf_counter() - t

        fn = _as_unet_fn(call)
        # The precompiled graph is dynamic in the batch already; its slots' inputs need no
        # marking (as in BucketedCFGUNet).
        pool = torch.cuda.graph_pool_handle() if device == "cuda" else None
        seconds: dict[int, float] = {}
        errors: dict[int, float] = {}
        for b in sorted(rows, reverse=True):
            t = time.perf_counter()
            slot = _UNetSlot(b, fn, dtype=dtype, device=dev, sample_shape=sample_shape, context_shape=context_shape,
                             compiled=phase == "cache-load", graph=device == "cuda", pool=pool)
            if device == "cuda":
                torch.cuda.synchronize()
            seconds[b] = time.perf_counter() - t
            x, tt, ctx = example(b)
            got = slot.run(x, tt, ctx)
            want = unet_call(unet, x, tt, ctx).float()
            errors[b] = float((got - want).norm() / want.norm())
        out["bucket_s"] = seconds
        out["buckets_s"] = sum(seconds.values())
        out["max_rel_error"] = max(errors.values())
        from torch._dynamo.utils import counters

        out["graphs_traced"] = int(counters["stats"]["unique_graphs"])
    return finish(out, t0)


def _traced(unet: Any) -> Any:
    """The fast path's way: ``torch.compile`` of the call, traced on first use."""
    import torch

    from imagegenx.engine.fastpath import _compile, _mark_batch_dynamic
    from imagegenx.engine.precompile import unet_call

    compiled = _compile(unet_call)

    def call(x: torch.Tensor, t: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        _mark_batch_dynamic(x, t, ctx)
        return compiled(unet, x, t, ctx)

    return call


def finish(out: dict[str, Any], t0: float) -> dict[str, Any]:
    out["total_s"] = time.perf_counter() - t0
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=REPO / "var" / "models" / "sd15")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--buckets", default="1,2,4,8,16,32", help="image buckets (row buckets are derived)")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "precompile_unet")
    ap.add_argument("--phases", default=",".join(PHASES), help=f"comma-separated, of {', '.join(PHASES)}")
    ap.add_argument("--phase", choices=PHASES, help=argparse.SUPPRESS)
    ap.add_argument("--artifact", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    buckets = [int(b) for b in args.buckets.split(",")]
    if args.phase:
        print(json.dumps(run_phase(args.phase, args.model, args.artifact, args.device, buckets)))
        return 0
    phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    unknown = sorted(set(phases) - set(PHASES))
    if unknown:
        ap.error(f"--phases: unknown phase(s) {', '.join(unknown)}; choose from {', '.join(PHASES)}")
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"command": "python -m bench.precompile_unet " + " ".join(argv or sys.argv[1:]),
                              "date": now_utc(), "machine": machine(), "device": args.device,
                              "buckets": buckets, "phases": []}
    work = Path(tempfile.mkdtemp(prefix="precompile_unet."))  # the artifacts: not kept with the report
    artifacts = {"precompile": work / "unet.precompiled", "cache": work / "unet.cache.bin"}
    print(f"{'phase':17} {'process':>8} {'imports':>8} {'model':>6} {'compile':>8} {'load':>6} {'buckets':>8} "
          f"{'graphs':>6} {'max err':>8}")
    for phase in phases:
        with tempfile.TemporaryDirectory() as caches:
            env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": f"{caches}/inductor", "TRITON_CACHE_DIR": f"{caches}/triton"}
            t0 = time.perf_counter()
            done = subprocess.run([sys.executable, "-m", "bench.precompile_unet", "--phase", phase,
                                   "--model", str(args.model), "--device", args.device, "--buckets", args.buckets,
                                   "--artifact", str(artifacts[phase.split("-")[0]])],
                                  cwd=REPO, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            row: dict[str, Any] = {"phase": phase, "error": done.stderr[-3000:]}
            last = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"
            print(f"{phase:17} failed: {last}")
        else:
            row = json.loads(done.stdout.strip().splitlines()[-1])

            def num(key: str, fmt: str = "8.1f") -> str:
                return format(row[key], fmt) if key in row else " " * int(fmt.split(".")[0])

            print(f"{phase:17} {time.perf_counter() - t0:8.1f} {num('imports_s')} {num('model_s', '6.1f')} "
                  f"{num('compile_s')} {num('artifact_load_s', '6.1f')} {num('buckets_s')} "
                  f"{row.get('graphs_traced', ''):>6} {num('max_rel_error', '8.1e')}")
        row["process_s"] = time.perf_counter() - t0
        report["phases"].append(row)
        (args.out / "precompile_unet.json").write_text(json.dumps(report, indent=2))
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
