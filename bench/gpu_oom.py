"""Out of memory for real: an oversized batch on a GPU is split and retried.

Loads the SD1.5 architecture (random weights) on CUDA, then hands the
pipeline one batch far larger than the card holds (default 128 images at
1024x1024). The pipeline must catch the CUDA out-of-memory error, free the
failed batch's memory, retry in halves, learn a lower image limit, and finish
every request. Prints every engine call (size, outcome, seconds) and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from bench.harness import machine, now_utc


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--requests", type=int, default=128)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--model", type=Path, default=None, help="SD1.5 folder (written if missing)")
    ap.add_argument("--out", type=Path, default=Path("bench/results/gpu_oom.json"))
    args = ap.parse_args(argv)

    import torch

    from imagegenx.engine.diffusion import DiffusionEngine
    from imagegenx.engine.model_init import write_sd15_model
    from imagegenx.pipeline import BatchPipeline
    from imagegenx.request_state import RequestState
    from imagegenx.schemas import GenerateRequest
    from imagegenx.storage import LocalStorage

    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    tmp = Path(tempfile.mkdtemp())
    model = args.model or tmp / "sd15"
    if not (model / "model_index.json").exists():
        write_sd15_model(model)
    engine = DiffusionEngine.load(model, device="cuda", dtype="fp16")
    calls: list[dict[str, Any]] = []
    generate = engine.generate

    def traced(spec, on_step=None):  # type: ignore[no-untyped-def]
        t0 = time.perf_counter()
        try:
            out = generate(spec, on_step)
        except Exception as exc:
            calls.append({"images": len(spec.samples), "outcome": type(exc).__name__,
                          "seconds": time.perf_counter() - t0})
            raise
        torch.cuda.synchronize()
        calls.append({"images": len(spec.samples), "outcome": "ok",
                      "seconds": time.perf_counter() - t0})
        return out

    engine.generate = traced  # type: ignore[method-assign]
    pipe = BatchPipeline(engine, LocalStorage(tmp / "images"), "http://127.0.0.1", "sd15")
    states = [RequestState(uuid.uuid4().hex, GenerateRequest(prompt=f"oversized batch {i}", seed=i,
                                                             width=args.size, height=args.size,
                                                             steps=args.steps))
              for i in range(args.requests)]
    t0 = time.perf_counter()
    outcomes = pipe.run(states)
    wall = time.perf_counter() - t0
    ok = sum(1 for o in outcomes.values() if o.result is not None)
    report = {
        "benchmark": "gpu_oom", "date": now_utc(), "machine": machine(),
        "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
        "requests": args.requests, "size": args.size, "steps": args.steps,
        "succeeded": ok, "failed": args.requests - ok, "learned_image_limit": pipe.image_limit,
        "wall_s": wall, "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
        "engine_calls": calls,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"{report['gpu']}, torch {torch.__version__}, {now_utc()}")
    print(f"{'call':>4} {'images':>7} {'outcome':>20} {'s':>7}")
    for i, c in enumerate(calls):
        print(f"{i:4d} {c['images']:7d} {c['outcome']:>20} {c['seconds']:7.2f}")
    print(f"{ok}/{args.requests} succeeded; learned limit {pipe.image_limit} images; "
          f"{wall:.1f} s; peak {report['peak_memory_gib']:.1f} GiB")
    return 0 if ok == args.requests else 1


if __name__ == "__main__":
    raise SystemExit(main())
