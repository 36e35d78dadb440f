"""Quality and CPU speed of the shapes model: does the picture show what the prompt says?

Draws one image per prompt for 200 held-out prompts (colour/shape/background
combinations never seen in training) and 200 prompts of seen combinations, at
20 steps, scores each with imagegenx.shapes.scorer, and times single 64x64
images on the CPU. Prints a table, writes JSON and a contact sheet PNG.

    python -m bench.shapes_quality                       # the embedded model, on the CPU
    python -m bench.shapes_quality --device cuda --model var/models/shapes-new
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

from bench.harness import machine, now_utc

TARGETS = {"colours": 0.90, "shape": 0.80, "cpu_image_s": 1.0}


def _shown(path: Path) -> str:
    """A model path as reports show it: relative to the working directory when inside it."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None, help="model folder (default: the embedded shapes model)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--prompts", type=int, default=200, help="prompts per set")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--sampler", default="euler")
    ap.add_argument("--batch", type=int, default=50)
    ap.add_argument("--latency-runs", type=int, default=10, help="timed single-image runs on the CPU (0: none)")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads for the timing")
    ap.add_argument("--out", type=Path, default=Path("bench/results/shapes_quality.json"))
    args = ap.parse_args(argv)

    import torch
    from PIL import Image

    from imagegenx.engine.base import BatchSpec, Sample
    from imagegenx.engine.diffusion import DiffusionEngine
    from imagegenx.shapes.captions import evaluation_prompts
    from imagegenx.shapes.model_files import SHAPES_MODEL, packaged
    from imagegenx.shapes.scorer import prompt_accuracy

    model = packaged(args.model) if args.model else SHAPES_MODEL
    dtype = "fp32" if args.device == "cpu" else "fp16"
    torch.set_num_threads(args.threads)
    engine = DiffusionEngine.load(model, device=args.device, dtype=dtype)
    width, height = engine.native_size

    def draw(prompts: list[str], first_seed: int) -> list[Image.Image]:
        images: list[Image.Image] = []
        for i in range(0, len(prompts), args.batch):
            chunk = prompts[i:i + args.batch]
            samples = tuple(Sample(p, first_seed + i + k, args.guidance) for k, p in enumerate(chunk))
            spec = BatchSpec(width, height, args.steps, args.sampler, samples)
            images += [im for im in engine.generate(spec) if im is not None]
        return images

    report: dict[str, Any] = {"when": now_utc(), "machine": machine(), "model": _shown(model),
                              "device": args.device, "steps": args.steps, "guidance": args.guidance,
                              "sampler": args.sampler, "targets": TARGETS, "sets": {}}
    sheet: list[Image.Image] = []
    for name, held in (("held-out", True), ("seen", False)):
        prompts = evaluation_prompts(args.prompts, held_out=held)
        t0 = time.perf_counter()
        images = draw(prompts, first_seed=0)
        seconds = time.perf_counter() - t0
        acc = prompt_accuracy(images, prompts)
        report["sets"][name] = {"prompts": len(prompts), "accuracy": acc, "seconds": seconds}
        sheet += images[:32] if held else []
    if args.latency_runs:
        cpu = engine if args.device == "cpu" else DiffusionEngine.load(model, device="cpu", dtype="fp32")
        spec = BatchSpec(width, height, args.steps, args.sampler,
                         (Sample("a red circle on a blue background", 1, args.guidance),))
        cpu.generate(spec)  # warm-up
        times = []
        for _ in range(args.latency_runs):
            t0 = time.perf_counter()
            cpu.generate(spec)
            times.append(time.perf_counter() - t0)
        report["cpu_image_s"] = {"median": statistics.median(times), "min": min(times), "max": max(times),
                                 "runs": len(times), "threads": args.threads}

    print(f"shapes model {_shown(model)} on {args.device}: {args.steps} steps, CFG {args.guidance}, {args.sampler}")
    print(f"{'set':<10}{'prompts':>8}{'colours':>9}{'colour':>8}{'backgr.':>8}{'shape':>7}{'size':>7}"
          f"{'position':>9}{'all':>6}")
    for name, s in report["sets"].items():
        a = s["accuracy"]
        print(f"{name:<10}{s['prompts']:>8}{a['colours']:>9.1%}{a['colour']:>8.1%}{a['background']:>8.1%}"
              f"{a['shape']:>7.1%}{a['size']:>7.1%}{a['position']:>9.1%}{a['all']:>6.1%}")
    held = report["sets"]["held-out"]["accuracy"]
    verdicts = {"colours": held["colours"] >= TARGETS["colours"], "shape": held["shape"] >= TARGETS["shape"]}
    if "cpu_image_s" in report:
        med = report["cpu_image_s"]["median"]
        verdicts["cpu_image_s"] = med <= TARGETS["cpu_image_s"]
        print(f"one {width}x{height} image on the CPU ({args.threads} threads): median {med:.3f} s "
              f"(min {report['cpu_image_s']['min']:.3f}, {args.latency_runs} runs)")
    report["meets_targets"] = verdicts
    for k, ok in verdicts.items():
        print(f"target {k} (held-out): {'met' if ok else 'MISSED'}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    if sheet:
        cols = 8
        grid = Image.new("RGB", (cols * width, ((len(sheet) + cols - 1) // cols) * height))
        for i, im in enumerate(sheet):
            grid.paste(im, ((i % cols) * width, (i // cols) * height))
        grid.save(args.out.with_suffix(".png"))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
