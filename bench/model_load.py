"""Where a worker's model load goes: imports, each module's ``from_pretrained``,
and the move to the device, for the ways diffusers can place the weights.

The worker's load (``DiffusionEngine.load``) was 15.7 s of its 38.7 s to ready
on the H200 (docs/BENCHMARKS.md section 11). Each variant runs in a fresh
process, so imports and the page cache are measured as a new worker meets them
(the page cache stays warm after the first variant; the first is repeated last
to show it):

- ``cpu``: ``from_pretrained`` on the CPU in the target dtype, then ``.to(device)``
  (what the worker does; lazy with accelerate installed, else a random init first);
- ``direct``: ``from_pretrained(device_map=device)``: the weights go from the
  file straight to the device.

    python -m bench.model_load --model var/models/sd15 --out bench/results/model_load

Prints a table and writes ``model_load.json`` to ``--out``.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.harness import REPO, machine, now_utc

VARIANTS = ("cpu", "direct")


def measure(model: Path, device: str, dtype: str, variant: str) -> dict[str, Any]:
    """One load, timed by part (in this process)."""
    t0 = time.perf_counter()
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.utils import is_accelerate_available
    from transformers import CLIPTextModel

    from imagegenx.engine.diffusion import torch_dtype_of

    seconds: dict[str, float] = {"imports": time.perf_counter() - t0}
    torch_dtype = torch_dtype_of(dtype)
    where = {"pretrained_model_name_or_path": str(model), "local_files_only": True}
    place = {"device_map": device} if variant == "direct" else {}
    lazy = {"low_cpu_mem_usage": is_accelerate_available()}
    modules = []
    for name, cls in (("unet", UNet2DConditionModel), ("vae", AutoencoderKL)):
        t = time.perf_counter()
        modules.append(cls.from_pretrained(**where, **lazy, **place, subfolder=name, torch_dtype=torch_dtype))
        seconds[name] = time.perf_counter() - t
    t = time.perf_counter()
    modules.append(CLIPTextModel.from_pretrained(**where, **place, subfolder="text_encoder").to(torch_dtype))
    seconds["text_encoder"] = time.perf_counter() - t
    t = time.perf_counter()
    for module in modules:
        module.to(device)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds["to_device"] = time.perf_counter() - t
    seconds["total"] = time.perf_counter() - t0
    return {"variant": variant, "accelerate": is_accelerate_available(), "seconds": seconds}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=REPO / "var" / "models" / "sd15")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="fp16")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "model_load")
    ap.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.variant:
        print(json.dumps(measure(args.model, args.device, args.dtype, args.variant)))
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"command": "python -m bench.model_load " + " ".join(argv or sys.argv[1:]),
                              "date": now_utc(), "machine": machine(), "runs": []}
    print(f"{'variant':8} {'imports':>8} {'unet':>7} {'vae':>7} {'text':>7} {'to dev':>7} {'total':>7}")
    for variant in (*VARIANTS, VARIANTS[0]):
        t0 = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "bench.model_load", "--variant", variant,
                               "--model", str(args.model), "--device", args.device, "--dtype", args.dtype],
                              cwd=REPO, capture_output=True, text=True)
        if done.returncode != 0:
            run: dict[str, Any] = {"variant": variant, "error": done.stderr[-2000:]}
            print(f"{variant:8} failed: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else ''}")
        else:
            run = json.loads(done.stdout.strip().splitlines()[-1])
            s = run["seconds"]
            print(f"{variant:8} {s['imports']:8.2f} {s['unet']:7.2f} {s['vae']:7.2f} {s['text_encoder']:7.2f} "
                  f"{s['to_device']:7.2f} {s['total']:7.2f}")
        run["process_s"] = time.perf_counter() - t0
        report["runs"].append(run)
        (args.out / "model_load.json").write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
