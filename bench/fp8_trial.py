"""torchao FP8 against bf16 for the SD1.5 UNet, measured in one run on one GPU.

FP8 (torchao's dynamic per-row float8 activations and weights, Linear layers
only) needs bf16 weights. This trial times the eager UNet forward of one
denoising step for 16 images with CFG (batch 32, 64x64 latents) both ways,
with random SD1.5-architecture weights, and reports how much the output moves.
Compile time of FP8 is reported separately by the fast path's warm-up, so the
eager comparison comes first. Prints a table and writes JSON.

    python -m bench.fp8_trial --out bench/results/fp8_trial.json
"""
from __future__ import annotations

import argparse
import json
import time
import traceback
from pathlib import Path
from typing import Any

from bench.harness import machine, now_utc


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=32, help="UNet batch (images x 2 with CFG)")
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--out", type=Path, default=Path("bench/results/fp8_trial.json"))
    args = ap.parse_args(argv)

    import torch
    from diffusers import UNet2DConditionModel

    from imagegenx.engine.model_init import SD15_UNET

    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    report: dict[str, Any] = {"when": now_utc(), "machine": machine(), "batch": args.batch,
                              "gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
    torch.manual_seed(0)
    with torch.device("cuda"):
        unet = UNet2DConditionModel(**SD15_UNET).to(torch.bfloat16).eval().requires_grad_(False)
        x = torch.randn(args.batch, 4, 64, 64, dtype=torch.bfloat16)
        ctx = torch.randn(args.batch, 77, 768, dtype=torch.bfloat16)
        t = torch.full((args.batch,), 500, dtype=torch.long)

    def timed(label: str) -> torch.Tensor:
        with torch.inference_mode():
            for _ in range(3):
                out = unet(x, t, ctx).sample
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(args.runs):
                out = unet(x, t, ctx).sample
            end.record()
            torch.cuda.synchronize()
        report[label] = {"ms": start.elapsed_time(end) / args.runs}
        return out.float()

    reference = timed("bf16_eager")
    try:
        import torchao
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

        report["torchao"] = torchao.__version__
        t0 = time.perf_counter()
        quantize_(unet, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()))
        report["quantize_s"] = time.perf_counter() - t0
        fp8 = timed("fp8_eager")
        report["fp8_eager"]["relative_error"] = float((fp8 - reference).norm() / reference.norm())
    except Exception as exc:  # noqa: BLE001 - a failure is the finding: report it
        report["fp8_error"] = "".join(traceback.format_exception_only(exc)).strip()
        report["fp8_traceback"] = traceback.format_exc()

    print(f"SD1.5 UNet forward, batch {args.batch}, 64x64 latents, {report['gpu']}, torch {report['torch']}")
    print(f"{'variant':<12}{'ms':>9}{'vs bf16':>9}")
    base = report["bf16_eager"]["ms"]
    for label in ("bf16_eager", "fp8_eager"):
        if label in report:
            print(f"{label:<12}{report[label]['ms']:>9.1f}{base / report[label]['ms']:>8.2f}x")
    if "fp8_error" in report:
        print("fp8 failed:", report["fp8_error"])
    elif "fp8_eager" in report:
        print(f"fp8 output relative error vs bf16: {report['fp8_eager']['relative_error']:.4f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
