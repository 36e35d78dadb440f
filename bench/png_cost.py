"""What encoding a result's PNG costs under each ``IMAGEGENX_PNG_COMPRESSION``.

Every request's images are PNG-encoded between the decoded latents and the stored
result, so the encoding is on the critical path of each request. This times
``imagegenx.postprocess.to_png`` per setting on four kinds of picture, since
deflate's cost and gain depend on the content:

- ``noise``: uniform random pixels, close to what a model with random weights draws
  (the GPU benchmarks run such a model); nothing to compress;
- ``grain``: a smooth colour field with fine grain, like a photograph;
- ``smooth``: the smooth field alone, like a soft illustration or a sky;
- ``flat``: a few flat-coloured shapes on a flat background, like a logo or a diagram.

It prints a table (median ms and KB per setting and picture) and writes
``png_cost.json`` into ``--out``::

    python -m bench.png_cost --out docs/benchmarks
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import PIL
from PIL import Image, ImageDraw

from imagegenx.postprocess import PNG_OPTIONS, to_png


def pictures(size: int, seed: int = 0) -> dict[str, Image.Image]:
    rng = np.random.default_rng(seed)
    noise = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    field = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize(
        (size, size), Image.Resampling.BICUBIC)
    grain = np.clip(np.asarray(field).astype(np.int16) + rng.integers(-4, 5, (size, size, 3)), 0, 255)
    flat = Image.new("RGB", (size, size), (235, 228, 210))
    draw = ImageDraw.Draw(flat)
    for i in range(6):
        x, y, r = (int(v) for v in rng.integers(size // 8, size - size // 8, 3) // (1, 1, 4))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if i % 2 else draw.rectangle)((x - r, y - r, x + r, y + r), fill=colour)
    return {"noise": Image.fromarray(noise), "grain": Image.fromarray(grain.astype(np.uint8)),
            "smooth": field, "flat": flat}


def measure(image: Image.Image, compression: str, reps: int) -> dict[str, float]:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        data = to_png(image, compression)  # type: ignore[arg-type]
        times.append(time.perf_counter() - t0)
    return {"ms": statistics.median(times) * 1e3, "kb": len(data) / 1024}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="512,1024", help="square picture sides, comma-separated")
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    rows: list[dict[str, Any]] = []
    print("| picture | side | " + " | ".join(f"{c}: ms, KB" for c in PNG_OPTIONS) + " | fast / small time |")
    print("|---|---|" + "---|" * (len(PNG_OPTIONS) + 1))
    for size in sizes:
        for kind, image in pictures(size).items():
            row: dict[str, Any] = {"picture": kind, "side": size}
            row.update({c: measure(image, c, args.reps) for c in PNG_OPTIONS})
            row["fast_over_small_time"] = row["fast"]["ms"] / row["small"]["ms"]
            rows.append(row)
            cells = " | ".join(f"{row[c]['ms']:.1f}, {row[c]['kb']:.0f}" for c in PNG_OPTIONS)
            print(f"| {kind} | {size} | {cells} | {row['fast_over_small_time']:.2f} |")
    args.out.mkdir(parents=True, exist_ok=True)
    out = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "machine": {"cpu": platform.processor() or platform.machine(), "python": platform.python_version(),
                       "pillow": PIL.__version__},
           "command": " ".join(["python -m bench.png_cost", *(sys.argv[1:] if argv is None else argv)]),
           "options": PNG_OPTIONS, "reps": args.reps, "rows": rows}
    (args.out / "png_cost.json").write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out / 'png_cost.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
