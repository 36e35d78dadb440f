"""Fit a model's preview map from its VAE and store it next to the model.

    python -m imagegenx.shapes.fit_preview [--model DIR] [--images 256] [--out FILE]

Default model: the shipped shapes model; default output: DIR/preview.json (the
file the engine loads). Prints the held-out RMSE and correlation of the
projection against the VAE decode. Any diffusers SD-layout folder works (an
SD1.5 folder gets its own map the same way).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL

from imagegenx.engine.preview_fit import fit
from imagegenx.preview import map_file
from imagegenx.shapes.model_files import SHAPES_MODEL


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m imagegenx.shapes.fit_preview", description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, default=SHAPES_MODEL, help="diffusers model folder (has vae/)")
    p.add_argument("--images", type=int, default=256, help="pictures encoded and decoded (a quarter held out)")
    p.add_argument("--size", type=int, default=None, help="picture side; default: the VAE's sample_size, at most 256")
    p.add_argument("--smooth", type=float, default=None,
                   help="share of smooth random colour fields among the pictures; default: 0 for the "
                        "shapes model (its VAE saw only its palette), 0.5 for others")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, default=None, help="default: MODEL/preview.json")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    vae = AutoencoderKL.from_pretrained(str(args.model), subfolder="vae", local_files_only=True,
                                        torch_dtype=torch.float32).to(args.device).eval()
    shapes = args.model.resolve() == SHAPES_MODEL.resolve()
    source = "the shipped shapes model" if shapes else args.model.name
    smooth = args.smooth if args.smooth is not None else 0.0 if shapes else 0.5
    fitted = fit(vae, count=args.images, size=args.size, source=f"{source} VAE", smooth=smooth)
    out = args.out or map_file(args.model)
    fitted.save(out)
    print(json.dumps(fitted.info))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
