"""Quality of limited-interval guidance on the shipped shapes model.

Draws the same held-out prompts (colour/shape/background combinations never
seen in training) with the same seeds once per variant: guidance intervals
[0,1], [0,0.6], [0,0.4], [0.1,0.6] at 20 Euler steps, and cheaper samplers at
fewer steps. Scores every image with imagegenx.shapes.scorer, and compares it
with the [0,1] image of the same seed by PSNR and SSIM. Prints a table, writes
JSON and a contact sheet PNG (one row per variant, the same prompts in every
column).

PSNR and SSIM are computed here with torch, so nothing beyond the engine's own
dependencies is needed: PSNR = 10 log10(255^2 / MSE) over all RGB values of an
image (identical images count as 100 dB); SSIM is Wang et al. (2004) with an
11x11 Gaussian window (sigma 1.5), K1 = 0.01, K2 = 0.03, data range 255, per
RGB channel over the valid (unpadded) window positions, averaged over the
channels; both are averaged over the images.

    python -m bench.guidance_quality                       # the embedded model, on the CPU
    python -m bench.guidance_quality --prompts 50 --out /tmp/q.json
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.harness import machine, now_utc

INTERVALS: tuple[tuple[float, float], ...] = ((0.0, 1.0), (0.0, 0.6), (0.0, 0.4), (0.1, 0.6))
# The quality target of a cheaper default: at most this many accuracy points lost against [0,1].
MAX_LOSS_POINTS = 1.0
TARGET_FIELDS = ("colour", "shape", "position")


@dataclass(frozen=True)
class Variant:
    name: str
    interval: tuple[float, float]
    steps: int = 20
    sampler: str = "euler"


def variants(extra: bool) -> list[Variant]:
    out = [Variant(f"[{a:g},{b:g}]", (a, b)) for a, b in INTERVALS]
    if extra:  # a cheaper sampler at fewer steps, guided throughout
        out += [Variant("dpmpp_2m 12 steps", (0.0, 1.0), 12, "dpmpp_2m"),
                Variant("dpmpp_2m 10 steps", (0.0, 1.0), 10, "dpmpp_2m")]
    return out


def psnr(a: Any, b: Any) -> float:
    """PSNR in dB of two uint8 arrays (100 for identical images)."""
    import numpy as np

    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 100.0 if mse == 0 else 10.0 * math.log10(255.0 ** 2 / mse)


def ssim(a: Any, b: Any) -> float:
    """Mean SSIM of two HxWx3 uint8 arrays (see the module docstring)."""
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(a).double().permute(2, 0, 1).unsqueeze(1)  # (3, 1, H, W)
    y = torch.from_numpy(b).double().permute(2, 0, 1).unsqueeze(1)
    g = torch.exp(-((torch.arange(11, dtype=torch.float64) - 5) ** 2) / (2 * 1.5 ** 2))
    g = g / g.sum()
    w = (g[:, None] * g[None, :]).view(1, 1, 11, 11)
    mx, my = F.conv2d(x, w), F.conv2d(y, w)
    sxx = F.conv2d(x * x, w) - mx * mx
    syy = F.conv2d(y * y, w) - my * my
    sxy = F.conv2d(x * y, w) - mx * my
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    m = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    return float(m.mean())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None, help="model folder (default: the embedded shapes model)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--prompts", type=int, default=200, help="held-out prompts")
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--batch", type=int, default=50)
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--no-extra", action="store_true", help="intervals only (no fewer-step samplers)")
    ap.add_argument("--sheet-columns", type=int, default=16)
    ap.add_argument("--out", type=Path, default=Path("docs/benchmarks/guidance_interval_quality.json"))
    args = ap.parse_args(argv)

    import numpy as np
    import torch
    from PIL import Image

    from imagegenx.engine.base import BatchSpec, Sample
    from imagegenx.engine.diffusion import DiffusionEngine
    from imagegenx.guidance import trajectory_rows
    from imagegenx.shapes.captions import evaluation_prompts
    from imagegenx.shapes.model_files import SHAPES_MODEL, packaged
    from imagegenx.shapes.scorer import prompt_accuracy

    model = packaged(args.model) if args.model else SHAPES_MODEL
    torch.set_num_threads(args.threads)
    engine = DiffusionEngine.load(model, device=args.device, dtype="fp32" if args.device == "cpu" else "fp16")
    width, height = engine.native_size
    prompts = evaluation_prompts(args.prompts, held_out=True)

    def draw(v: Variant) -> list[Image.Image]:
        images: list[Image.Image] = []
        for i in range(0, len(prompts), args.batch):
            samples = tuple(Sample(p, i + k, args.guidance, "", v.interval)
                            for k, p in enumerate(prompts[i:i + args.batch]))
            images += [im for im in engine.generate(BatchSpec(width, height, v.steps, v.sampler, samples))
                       if im is not None]
        return images

    report: dict[str, Any] = {
        "when": now_utc(), "machine": machine(), "model": str(model), "device": args.device,
        "command": " ".join(["python -m bench.guidance_quality", *(argv if argv is not None else sys.argv[1:])]),
        "threads": args.threads, "guidance_scale": args.guidance, "prompts": len(prompts),
        "prompt_set": "held-out", "seeds": f"0..{len(prompts) - 1}",
        "metrics": "PSNR/SSIM against the [0,1] image of the same prompt and seed; see "
                   "bench/guidance_quality.py for the formulas",
        "variants": {}}
    sheet: list[list[Image.Image]] = []
    reference: list[Any] = []
    for v in variants(not args.no_extra):
        engine.unet_rows_run = 0
        t0 = time.perf_counter()
        images = draw(v)
        seconds = time.perf_counter() - t0
        arrays = [np.asarray(im.convert("RGB")) for im in images]
        if not reference:
            reference = arrays
        acc = prompt_accuracy(images, prompts)
        report["variants"][v.name] = {
            "interval": list(v.interval), "steps": v.steps, "sampler": v.sampler,
            "unet_rows_per_image": trajectory_rows(args.guidance, v.interval, v.steps),
            "unet_rows_counted": engine.unet_rows_run / len(images),
            "accuracy": acc, "seconds": seconds,
            "psnr_db": float(np.mean([psnr(a, b) for a, b in zip(arrays, reference)])),
            "ssim": float(np.mean([ssim(a, b) for a, b in zip(arrays, reference)])),
        }
        sheet.append(images[:args.sheet_columns])
        print(f"{v.name}: {seconds:.0f} s", flush=True)

    base = report["variants"][variants(False)[0].name]
    for name, r in report["variants"].items():
        # Rounded: accuracies are fractions of the prompts, so 1 point of 200 prompts is exact.
        loss = {f: round(100.0 * (base["accuracy"][f] - r["accuracy"][f]), 6) for f in TARGET_FIELDS}
        r["loss_points"] = loss
        r["rows_saving"] = base["unet_rows_per_image"] / r["unet_rows_per_image"]
        r["meets_quality_target"] = all(x <= MAX_LOSS_POINTS for x in loss.values())

    print(f"shapes model, {len(prompts)} held-out prompts, CFG {args.guidance}, {args.device}")
    print(f"{'variant':<20}{'rows/img':>9}{'colour':>8}{'shape':>7}{'position':>9}{'colours':>8}"
          f"{'all':>7}{'PSNR':>7}{'SSIM':>7}{'quality ok':>11}")
    for name, r in report["variants"].items():
        a = r["accuracy"]
        print(f"{name:<20}{r['unet_rows_per_image']:>9}{a['colour']:>8.1%}{a['shape']:>7.1%}"
              f"{a['position']:>9.1%}{a['colours']:>8.1%}{a['all']:>7.1%}{r['psnr_db']:>7.1f}"
              f"{r['ssim']:>7.3f}{'yes' if r['meets_quality_target'] else 'no':>11}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    cols = max(len(row) for row in sheet)
    grid = Image.new("RGB", (cols * width, len(sheet) * height), "white")
    for r, row in enumerate(sheet):
        for c, im in enumerate(row):
            grid.paste(im, (c * width, r * height))
    grid.save(args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
