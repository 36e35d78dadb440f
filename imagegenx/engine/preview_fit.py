"""Fit a model's preview map (``imagegenx.preview.PreviewMap``) from its own VAE.

Pictures (the shapes renderer's scenes and smooth random colour fields) are
encoded with the VAE; the latents, scaled as the UNet sees them, are decoded
again, and the decode, averaged down to latent resolution, is the target of a
least-squares fit ``rgb = latent . W + b``. So the map approximates what the
VAE decode of *these latents* shows, which is what a preview stands in for.
Pictures held out of the fit measure it: RMSE (0..1 scale) and the Pearson
correlation between the projection and the decode, both stored with the map.
"""
from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from imagegenx.preview import PreviewMap

FIT_SEED = 20261203


def fitting_images(count: int, size: int, seed: int = FIT_SEED, smooth: float = 0.5) -> torch.Tensor:
    """(count, 3, size, size) in [0, 1]: shapes scenes and, a ``smooth`` share of them,
    smooth random colour fields (for a VAE that saw more than the shapes palette)."""
    from imagegenx.shapes.captions import all_triplets, random_scene
    from imagegenx.shapes.render import render

    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    scenes = [random_scene(rng, all_triplets())[0] for _ in range(count - int(count * smooth))]
    shapes = render(scenes, rng, size=size)
    fields = F.interpolate(torch.rand(count - len(scenes), 3, 4, 4, generator=gen), size=(size, size),
                           mode="bicubic", align_corners=False).clamp(0, 1)
    return torch.cat([shapes, fields])


@torch.inference_mode()
def latents_and_decodes(vae: Any, images: torch.Tensor, batch: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """(scaled latents (N, C, h, w), VAE decode averaged to (N, 3, h, w) in [0, 1]), fp32 on the CPU."""
    device = next(vae.parameters()).device
    dtype = next(vae.parameters()).dtype
    scale = float(vae.config.scaling_factor)
    lats, decs = [], []
    for chunk in images.split(batch):
        x = (chunk.to(device, dtype) * 2 - 1)
        latent = vae.encode(x).latent_dist.mean
        decoded = (vae.decode(latent).sample.float() / 2 + 0.5).clamp(0, 1)
        factor = decoded.shape[-1] // latent.shape[-1]
        lats.append((latent.float() * scale).cpu())
        decs.append(F.avg_pool2d(decoded, factor).cpu())
    return torch.cat(lats), torch.cat(decs)


def _pixels(t: torch.Tensor) -> np.ndarray:
    """(N, K, h, w) -> (N*h*w, K)."""
    return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1]).numpy().astype(np.float64)


def solve(latents: torch.Tensor, target: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Least squares: (C, 3) weights and (3,) bias with target ~ latents . W + b."""
    x, y = _pixels(latents), _pixels(target)
    finite = np.isfinite(x).all(1) & np.isfinite(y).all(1)  # a half-precision VAE may overflow
    a = np.concatenate([x[finite], np.ones((int(finite.sum()), 1))], axis=1)
    coef, *_ = np.linalg.lstsq(a, y[finite], rcond=None)
    return coef[:-1], coef[-1]


def measure(m: PreviewMap, latents: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """RMSE (0..1) and Pearson correlation of the map's projection against the decode."""
    pred = m.project(latents.numpy()).astype(np.float64) / 255.0
    true = target.permute(0, 2, 3, 1).numpy().astype(np.float64)
    rmse = float(np.sqrt(np.mean((pred - true) ** 2)))
    corr = float(np.corrcoef(pred.ravel(), true.ravel())[0, 1])
    return {"rmse": round(rmse, 5), "correlation": round(corr, 5)}


def fit(vae: Any, count: int = 256, size: int | None = None, holdout: float = 0.25,
        seed: int = FIT_SEED, source: str = "", smooth: float = 0.5) -> PreviewMap:
    """The preview map of ``vae``, with its held-out error in ``info``."""
    side = size or min(int(getattr(vae.config, "sample_size", 64) or 64), 256)
    images = fitting_images(count, side, seed, smooth)
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    images = images[order]
    latents, target = latents_and_decodes(vae, images)
    n_test = max(1, int(count * holdout))
    weights, bias = solve(latents[n_test:], target[n_test:])
    m = PreviewMap(tuple(tuple(float(round(v, 6)) for v in row) for row in weights),
                   tuple(float(round(v, 6)) for v in bias))  # type: ignore[arg-type]
    info = {"source": source, "smooth_share": smooth, "images": count - n_test, "held_out": n_test, "size": side, "seed": seed,
            **measure(m, latents[:n_test], target[:n_test])}
    return PreviewMap(m.weights, m.bias, info)
