"""The UNet as an AOTInductor package: build time, and the time a fresh process
needs to load it and capture every row bucket, beside the compile-cache path.

Issue: a worker with the portable compile cache (``imagegenx optimize warmup``)
still spends its warm-up in Dynamo tracing the UNet and capturing each bucket
(docs/BENCHMARKS.md section 11). An AOTInductor package needs no tracing at
start: one shared library with a dynamic batch dimension (1 to the largest row
bucket) and the weights. This command measures both ways to the same state
(every row bucket ready to replay as a CUDA graph), each in a fresh process
whose ``TORCHINDUCTOR_CACHE_DIR`` and ``TRITON_CACHE_DIR`` are new empty folders:

1. ``load``: the model loaded as the worker loads it (``DiffusionEngine.load``);
2. ``export``: ``torch.export`` with a dynamic batch, ``aoti_compile_and_package``;
3. ``aoti_ready``: a fresh process loads the package and warms and captures
   every row bucket; then checks the package against the eager UNet;
4. ``cache_ready``: a fresh process loads the compile cache built from the
   same model (``imagegenx optimize warmup``) and prepares the fast path's UNet
   the same way (``BucketedCFGUNet.prepare``).

    python -m bench.aoti_unet --model var/models/sd15 --out bench/results/aoti_unet

Prints a table and writes ``aoti_unet.json`` to ``--out`` after each phase.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.cold_start import fresh_caches
from bench.harness import REPO, machine, now_utc

SEQ_LEN = 77


def load_engine(model: Path, compile_unet: bool) -> Any:
    """The engine as the GPU worker loads it (fp16, fused QKV, channels-last)."""
    from imagegenx.engine.diffusion import DiffusionEngine
    from imagegenx.engine.fastpath import FastPathOptions

    options = FastPathOptions(compile=compile_unet, cuda_graphs=True, text_encoder_graph=False)
    return DiffusionEngine.load(model, device="cuda", dtype="fp16", fast_path=options)


def unet_module(engine: Any) -> Any:
    """The UNet as a module of (latents, per-row timesteps, context) -> noise."""
    import torch

    from imagegenx.engine.upsample import single_branch_upsamplers

    unet = engine.unet
    single_branch_upsamplers(unet)

    class RowsUNet(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.unet = unet

        def forward(self, x: torch.Tensor, t: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
            return self.unet(x, t, encoder_hidden_states=ctx, return_dict=False)[0]

    return RowsUNet().eval()


def example(config: Any, rows: int) -> tuple[Any, Any, Any]:
    """Inputs of ``rows`` UNet rows for a UNet of ``config`` (its config mapping)."""
    import torch

    gen = torch.Generator(device="cpu").manual_seed(rows)
    size = config["sample_size"] if isinstance(config["sample_size"], int) else config["sample_size"][0]
    x = torch.randn((rows, config["in_channels"], size, size), generator=gen).to("cuda", torch.float16)
    ctx = torch.randn((rows, SEQ_LEN, config["cross_attention_dim"]), generator=gen).to("cuda", torch.float16)
    t = torch.linspace(50.0, 950.0, rows, device="cuda")
    return x, t, ctx


def phase_export(args: argparse.Namespace) -> dict[str, Any]:
    """Load, export with a dynamic batch, compile and package (in this process)."""
    import torch
    from torch.export import Dim, export

    t0 = time.perf_counter()
    engine = load_engine(args.model, compile_unet=False)
    load_s = time.perf_counter() - t0
    module = unet_module(engine)
    rows = Dim("rows", min=1, max=max(args.buckets))
    t1 = time.perf_counter()
    with torch.no_grad():
        program = export(module, example(engine.unet.config, 2), dynamic_shapes=({0: rows}, {0: rows}, {0: rows}))
    export_s = time.perf_counter() - t1
    t2 = time.perf_counter()
    path = torch._inductor.aoti_compile_and_package(
        program, package_path=str(args.out / "unet.pt2"), inductor_configs={"conv_1x1_as_mm": True})
    return {"load_s": load_s, "export_s": export_s, "package_s": time.perf_counter() - t2,
            "package_mb": Path(path).stat().st_size / 1e6}


def capture_all(fn: Any, config: Any, buckets: list[int]) -> dict[int, float]:
    """Warm and capture a CUDA graph of ``fn`` per row bucket, largest first (one pool)."""
    import torch

    pool = torch.cuda.graph_pool_handle()
    seconds: dict[int, float] = {}
    keep = []
    for b in sorted(buckets, reverse=True):
        t0 = time.perf_counter()
        x, t, ctx = example(config, b)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                fn(x, t, ctx)
        torch.cuda.current_stream().wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, pool=pool):
            out = fn(x, t, ctx)
        g.replay()
        torch.cuda.synchronize()
        keep.append((g, out))
        seconds[b] = time.perf_counter() - t0
    return seconds


def phase_aoti_ready(args: argparse.Namespace) -> dict[str, Any]:
    """Fresh process: load the package, capture every bucket; then check it."""
    import torch

    progress = args.out / "aoti_ready.partial.json"
    t0 = time.perf_counter()
    runner = torch._inductor.aoti_load_package(str(args.out / "unet.pt2"))
    load_s = time.perf_counter() - t0
    progress.write_text(json.dumps({"load_s": load_s}))
    from diffusers import UNet2DConditionModel

    config = UNet2DConditionModel.load_config(str(args.model), subfolder="unet")  # shapes only

    def call(x: Any, t: Any, ctx: Any) -> Any:
        return runner(x, t, ctx)

    with torch.no_grad():
        x, t, ctx = example(config, 2)
        t1 = time.perf_counter()
        runner(x, t, ctx)
        torch.cuda.synchronize()
        first_call_s = time.perf_counter() - t1
        progress.write_text(json.dumps({"load_s": load_s, "first_call_s": first_call_s}))
        per_bucket = capture_all(call, config, args.buckets)
    ready_s = time.perf_counter() - t0
    engine = load_engine(args.model, compile_unet=False)
    module = unet_module(engine)
    with torch.no_grad():
        x, t, ctx = example(engine.unet.config, 3)
        diff = (runner(x, t, ctx).float() - module(x, t, ctx).float()).abs().max().item()
    return {"load_s": load_s, "first_call_s": first_call_s, "capture_s": per_bucket, "ready_s": ready_s,
            "max_abs_diff_vs_eager": diff}


def phase_cache_ready(args: argparse.Namespace) -> dict[str, Any]:
    """Fresh process: the compile cache loaded, the fast path's UNet prepared."""
    import torch

    from imagegenx.compile_cache import load_compile_cache
    from imagegenx.compile_manifest import MANIFEST_FILE, CompileManifest
    from imagegenx.engine.fastpath import BucketedCFGUNet, FastPathOptions
    from imagegenx.settings import Settings

    t0 = time.perf_counter()
    engine = load_engine(args.model, compile_unet=True)
    load_s = time.perf_counter() - t0
    manifest = CompileManifest.model_validate(json.loads((args.cache / MANIFEST_FILE).read_text()))
    t1 = time.perf_counter()
    refused = load_compile_cache(str(args.cache), manifest, Settings())
    artifact_s = time.perf_counter() - t1
    c = engine.unet.config
    size = c.sample_size if isinstance(c.sample_size, int) else c.sample_size[0]
    # The image buckets whose UNet-row buckets (each and its double) are ``args.buckets``.
    image_buckets = [b for b in args.buckets if 2 * b <= max(args.buckets)]
    t2 = time.perf_counter()
    unet = BucketedCFGUNet(engine.unet, dtype=torch.float16, device=torch.device("cuda"),
                           sample_shape=(c.in_channels, size, size),
                           context_shape=(SEQ_LEN, c.cross_attention_dim),
                           options=FastPathOptions(buckets=tuple(image_buckets)))
    with torch.no_grad():
        per_bucket = unet.prepare()
    return {"load_s": load_s, "artifact_s": artifact_s, "refused": refused,
            "prepare_s": time.perf_counter() - t2, "capture_s": per_bucket,
            "unet_ready_s": time.perf_counter() - t1}


PHASES = {"export": phase_export, "aoti_ready": phase_aoti_ready, "cache_ready": phase_cache_ready}


def run_phase(name: str, args: argparse.Namespace, env: dict[str, str]) -> dict[str, Any]:
    """``name`` in a fresh process; its JSON report."""
    out = args.out / f"{name}.json"
    cmd = [sys.executable, "-m", "bench.aoti_unet", "--phase", name, "--model", str(args.model),
           "--out", str(args.out), "--buckets", ",".join(map(str, args.buckets))]
    if args.cache:
        cmd += ["--cache", str(args.cache)]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=REPO, env={**os.environ, "PYTHONFAULTHANDLER": "1", **env},
                          capture_output=True, text=True)
    wall = time.perf_counter() - t0
    (args.out / f"{name}.log").write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        partial = args.out / f"{name}.partial.json"
        return {"error": (done.stdout + done.stderr)[-2000:], "returncode": done.returncode, "process_s": wall,
                **({"partial": json.loads(partial.read_text())} if partial.exists() else {})}
    return {**json.loads(out.read_text()), "process_s": wall}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=REPO / "var" / "models" / "sd15")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "aoti_unet")
    ap.add_argument("--buckets", type=lambda s: [int(b) for b in s.split(",")],
                    default=[1, 2, 4, 8, 16, 32, 64], help="UNet row buckets (comma-separated)")
    ap.add_argument("--cache", type=Path, default=None,
                    help="a compile cache of `imagegenx optimize warmup` for the same model (cache_ready)")
    ap.add_argument("--phase", choices=sorted(PHASES), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.phase:  # one phase, in this (fresh) process
        (args.out / f"{args.phase}.json").write_text(json.dumps(PHASES[args.phase](args), indent=2))
        return 0
    report: dict[str, Any] = {"command": "python -m bench.aoti_unet " + " ".join(argv or sys.argv[1:]),
                              "date": now_utc(), "machine": machine(), "phases": {}}
    root = Path(tempfile.mkdtemp(prefix="aoti-caches-"))
    names = ["export", "aoti_ready"] + (["cache_ready"] if args.cache else [])
    for name in names:
        report["phases"][name] = run_phase(name, args, fresh_caches(root, name))
        (args.out / "aoti_unet.json").write_text(json.dumps(report, indent=2))
        print(f"{name}: {json.dumps(report['phases'][name])}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
