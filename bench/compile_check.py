"""How many graphs the fast path compiles for a set of buckets, and whether its
images match the eager engine: a real ``torch.compile`` (Inductor) in one
fresh process.

The fast path should compile the UNet once and the VAE decode once, whatever
the buckets (docs/BENCHMARKS.md 11d: a 1-row UNet bucket compiled the UNet a
second time). This runs the engine's own warm-up with empty Inductor caches,
counts the graphs Dynamo compiled, collects the recompile reasons Dynamo logs,
then draws a few requests with the fast path and with the eager engine and
reports the largest difference in uint8 levels. Uses the tiny model unless
``--model`` names another::

    python -m bench.compile_check --device cpu --buckets 1,2 --out bench/results/compile_check
    python -m bench.compile_check --device cuda --dtype fp16 --buckets 1,2,4,8,16,32 --out OUT

Prints a summary and writes ``compile_check_<device>.json`` to ``--out``.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.cold_start import fresh_caches
from bench.harness import machine, now_utc


class _Recompiles(logging.Handler):
    """Dynamo's recompile reasons (the ``torch._dynamo`` recompiles log artifact)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if "Recompiling" in text or "guard failure" in text:
            self.lines.append(text[:2000])


def check(model: Path, device: str, dtype: str, buckets: tuple[int, ...], channels_last: bool,
          requests: tuple[int, ...]) -> dict[str, Any]:
    """Warm the fast path up, count its graphs, and compare its images with eager ones."""
    import numpy as np
    import torch
    from torch._dynamo.utils import counters

    from imagegenx.engine.base import BatchSpec, Sample
    from imagegenx.engine.diffusion import DiffusionEngine
    from imagegenx.engine.fastpath import FastPathOptions

    torch._logging.set_logs(recompiles=True)
    recompiles = _Recompiles()
    logging.getLogger("torch._dynamo").addHandler(recompiles)
    options = FastPathOptions(compile=True, cuda_graphs=device.startswith("cuda"), buckets=buckets,
                              channels_last=channels_last, allow_cpu=device == "cpu")
    t0 = time.perf_counter()
    fast = DiffusionEngine.load(model, device, dtype, fast_path=options)
    report = fast.warmup()
    warmup_s = time.perf_counter() - t0
    eager = DiffusionEngine.load(model, device, dtype)
    size = fast.native_size[0]
    diffs: dict[str, int] = {}
    for n in requests:
        samples = tuple(Sample(f"prompt {i}", seed=10 + i, guidance_scale=4.0 + i) for i in range(n))
        spec = BatchSpec(size, size, 6, "euler", samples)
        got, want = fast.generate(spec), eager.generate(spec)
        diffs[str(n)] = max(int(np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).max())
                            for a, b in zip(got, want, strict=True))
    return {"buckets": list(buckets), "captured_row_buckets": report.get("captured_buckets"),
            "channels_last": channels_last, "warmup_s": round(warmup_s, 1),
            "compiled_graphs": int(counters["stats"]["unique_graphs"]),
            "recompile_reasons": recompiles.lines, "max_uint8_diff_by_images": diffs}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None, help="model folder (default: the tiny model, written)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None, help="default fp32 on the CPU, fp16 on CUDA")
    ap.add_argument("--buckets", default="1,2", help="image buckets (comma-separated)")
    ap.add_argument("--no-channels-last", action="store_true")
    ap.add_argument("--requests", default="1,3", help="images per compared request (comma-separated)")
    ap.add_argument("--out", type=Path, default=Path("bench/results/compile_check"))
    args = ap.parse_args(argv)
    try:
        buckets = tuple(int(b) for b in args.buckets.split(","))
        requests = tuple(int(n) for n in args.requests.split(","))
    except ValueError:
        ap.error("--buckets and --requests: comma-separated integers")
    dtype = args.dtype or ("fp32" if args.device == "cpu" else "fp16")
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.update(fresh_caches(Path(tmp), "compile-check"))  # what a fresh machine compiles
        model = args.model
        if model is None:
            from imagegenx.engine.model_init import write_tiny_model

            model = write_tiny_model(Path(tmp) / "tiny", seed=0)
        result = check(model, args.device, dtype, buckets, not args.no_channels_last, requests)
    report = {"date": now_utc(), "machine": machine(), "device": args.device, "dtype": dtype,
              "command": "python -m bench.compile_check " + " ".join(argv if argv is not None else sys.argv[1:]),
              **result}
    print(f"{args.device} {dtype}, image buckets {args.buckets} (UNet rows {result['captured_row_buckets']}), "
          f"channels_last {result['channels_last']}: {result['compiled_graphs']} graphs compiled "
          f"(expected 2: the UNet, the VAE decode), warm-up {result['warmup_s']} s, "
          f"largest difference from eager {result['max_uint8_diff_by_images']} uint8 levels")
    for reason in result["recompile_reasons"]:
        for line in reason.splitlines()[:4]:
            print("  " + line.strip()[:300])
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"compile_check_{args.device.replace(':', '')}.json"
    path.write_text(json.dumps(report, indent=2))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
