"""Where a step-scheduler UNet call spends its time, in process (one GPU).

For n running rows: the bucketed UNet alone, the engine's whole ``step`` (row
samplers included), the request path's loop per step (``generate``), and one
``decode`` of one finished request. Prints a table and writes JSON::

    python -m bench.step_profile --model var/models/sd15 --out OUT
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from imagegenx.engine.base import BatchSpec, Sample
from imagegenx.engine.diffusion import DiffusionEngine
from imagegenx.engine.fastpath import FastPathOptions


def timed(fn, reps: int = 20) -> float:  # type: ignore[no-untyped-def]
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--out", type=Path, default=Path("."))
    ap.add_argument("--rows", default="1,2,4,8,16")
    args = ap.parse_args()
    engine = DiffusionEngine.load(args.model, device="cuda", dtype="fp16", fast_path=FastPathOptions())
    engine.warmup()
    w, h = engine.native_size
    rows: dict[str, dict[str, float]] = {}
    for n in (int(x) for x in args.rows.split(",")):
        specs = [BatchSpec(w, h, 1000, "euler", (Sample(f"p{i}", seed=i),)) for i in range(n)]
        states = [engine.begin(s) for s in specs]
        lat = torch.cat([s.latents for s in states]).half()
        cond = torch.cat([s.cond for s in states])
        t = torch.full((n,), 500.0, device="cuda")
        with torch.inference_mode():
            unet = timed(lambda: engine.fast.unet(lat, t, cond, cond))  # type: ignore[union-attr]
        step = timed(lambda: engine.step(states))
        whole = BatchSpec(w, h, 10, "euler", tuple(Sample(f"p{i}", seed=i) for i in range(n)))
        generate = (timed(lambda: engine.generate(whole), reps=3)) / 10
        rows[str(n)] = {"unet_ms": unet * 1e3, "step_ms": step * 1e3, "generate_per_step_ms": generate * 1e3}
        print(n, {k: round(v, 2) for k, v in rows[str(n)].items()}, flush=True)
    one = [engine.begin(BatchSpec(w, h, 1, "euler", (Sample("d", seed=1),)))]
    engine.step(one)
    decode = timed(lambda: engine.decode(one), reps=10)
    report = {"rows": rows, "decode_one_ms": decode * 1e3, "gpu": torch.cuda.get_device_name()}
    print(json.dumps(report), flush=True)
    (args.out / "step_profile.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
