"""What a preview costs next to a denoising step (SD1.5 architecture, random weights).

For ``--rows`` image rows (default 32, each its own request, at ``--size`` 512: 64x64
latents) it times

- ``step``: one eager UNet call with classifier-free guidance (UNet batch 2 x rows),
  as the step scheduler runs it;
- ``projection``: the preview projection of all rows on the device (latent -> RGB
  4x3 map, uint8), GPU time between CUDA events;
- ``model_thread``: wall time the model thread spends taking the previews (queue the
  projection and the non-blocking copy to pinned host memory), what the step loop pays;
- ``to_host``: until the pixels are on the host (the preview thread waits for this);
- ``png``: encoding every row's PNG and base64 on the CPU (the preview thread).

It prints a table and writes ``preview_cost.json`` into ``--out``; the target is a
preview under 2% of a step (``gpu_fraction``: projection / step). On a GPU::

    python -m bench.preview_cost --device cuda --dtype fp16 --out OUT

and a quick check of the command on the CPU with a tiny model::

    python -m bench.preview_cost --tiny --device cpu --dtype fp32 --out /tmp
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from diffusers import UNet2DConditionModel

from imagegenx.engine.fastpath import cfg_unet_eager
from imagegenx.engine.model_init import SD15_UNET, TINY_UNET
from imagegenx.engine.preview_gpu import Projection, project_states
from imagegenx.preview import PreviewMap, encode, map_file
from imagegenx.shapes.model_files import SHAPES_MODEL

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def wall_ms(fn: Callable[[], Any], device: torch.device, reps: int) -> list[float]:
    """Wall milliseconds of each call, the device idle before and after it."""
    out = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def device_ms(fn: Callable[[], Any], device: torch.device, reps: int) -> list[float]:
    """GPU milliseconds between CUDA events around each call (wall time on the CPU)."""
    if device.type != "cuda":
        return wall_ms(fn, device, reps)
    out = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        out.append(start.elapsed_time(end))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.preview_cost", description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp16")
    ap.add_argument("--rows", type=int, default=32, help="image rows in the UNet call (each its own request)")
    ap.add_argument("--size", type=int, default=512, help="image side in pixels (latents: size / 8)")
    ap.add_argument("--tiny", action="store_true", help="the tiny test UNet instead of SD1.5's (CPU check)")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--out", type=Path, default=Path("."))
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    torch.manual_seed(0)

    config = dict(TINY_UNET if args.tiny else SD15_UNET)
    unet = UNet2DConditionModel(**config).to(device, dtype).eval().requires_grad_(False)
    side = args.size // 8
    if args.tiny:
        side = min(side, int(config.get("sample_size", 8)))
    channels = int(config["in_channels"])
    width = int(config["cross_attention_dim"])
    n = args.rows
    latents = torch.randn(n, channels, side, side, device=device)
    cond = torch.randn(n, 77, width, device=device, dtype=dtype)
    t = torch.full((n,), 500.0, device=device)
    shapes_map = PreviewMap.load(map_file(SHAPES_MODEL))  # 4 channels; the cost is the map's size, not its values
    projection = Projection(shapes_map, device)
    per_request = [latents[i:i + 1] for i in range(n)]

    with torch.inference_mode():
        step = lambda: cfg_unet_eager(unet, dtype, latents, t, cond, cond)  # noqa: E731
        step()
        step_ms = device_ms(step, device, args.reps)
        project = lambda: projection(latents)  # noqa: E731
        project()
        projection_ms = device_ms(project, device, args.reps * 5)
        # The model thread's share: queue projection + copy, no waiting.
        frames_made: list[Any] = []
        model_thread_ms = []
        to_host_ms = []
        for _ in range(args.reps * 5):
            sync(device)
            t0 = time.perf_counter()
            frames = project_states(projection, per_request)
            t1 = time.perf_counter()
            arrays = frames.arrays()
            t2 = time.perf_counter()
            model_thread_ms.append((t1 - t0) * 1e3)
            to_host_ms.append((t2 - t0) * 1e3)
            frames_made.append(arrays)
    arrays = frames_made[-1]
    png_ms = wall_ms(lambda: [encode(a, 10) for a in arrays], torch.device("cpu"), args.reps)
    png_bytes = sum(len(encode(a, 10)["png_base64"]) for a in arrays)

    med = statistics.median
    report: dict[str, Any] = {
        "model": "tiny UNet" if args.tiny else "SD1.5 UNet (random weights)",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "dtype": args.dtype, "rows": n, "latent": [channels, side, side],
        "step_ms": med(step_ms),
        "projection_ms": med(projection_ms),
        "model_thread_ms": med(model_thread_ms),
        "to_host_ms": med(to_host_ms),
        "png_ms": med(png_ms),
        "png_base64_bytes": png_bytes,
        "reps": args.reps,
    }
    report["gpu_fraction"] = report["projection_ms"] / report["step_ms"]
    report["model_thread_fraction"] = report["model_thread_ms"] / report["step_ms"]
    report["png_fraction"] = report["png_ms"] / report["step_ms"]
    report["target_met"] = report["gpu_fraction"] < 0.02 and report["model_thread_fraction"] < 0.02

    print(f"preview cost: {report['model']}, {n} rows, latents {channels}x{side}x{side}, "
          f"{args.dtype} on {report['device']}")
    print(f"{'what':<34}{'ms':>10}{'of a step':>12}")
    rows = [("UNet step (CFG, eager)", report["step_ms"], None),
            ("projection on the device", report["projection_ms"], report["gpu_fraction"]),
            ("model thread (queue proj. + copy)", report["model_thread_ms"], report["model_thread_fraction"]),
            ("until pixels on the host", report["to_host_ms"], report["to_host_ms"] / report["step_ms"]),
            (f"PNG + base64, {n} previews (CPU)", report["png_ms"], report["png_fraction"])]
    for name, ms, frac in rows:
        print(f"{name:<34}{ms:>10.3f}{'' if frac is None else f'{100 * frac:>11.2f}%':>12}")
    print(f"target (< 2% of a step on the device and the model thread): {'met' if report['target_met'] else 'NOT met'}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "preview_cost.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out / 'preview_cost.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
