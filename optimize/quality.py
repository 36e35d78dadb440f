"""Image quality of one backend against another: PSNR, SSIM, max difference.

Images are compared as uint8 RGB, which is what the service stores. SSIM is the
standard single-scale SSIM (Wang et al. 2004): 11x11 Gaussian window with
sigma 1.5, K1 0.01, K2 0.03, data range 255, computed per channel over the
window positions that fit entirely inside the image, then averaged.

A scorer measures something the pixel metrics cannot, e.g. whether a model
trained on coloured shapes drew the colour and shape the prompt asked for. It
is any function ``(images, prompts) -> {metric: value}``, plugged in as
``module:function`` (``load_scorer``).
"""
from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

Scorer = Callable[[Sequence[Image.Image], Sequence[str]], Mapping[str, float]]

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03
DATA_RANGE = 255.0


def _as_array(image: Image.Image | np.ndarray) -> np.ndarray:
    array = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    return array.astype(np.float64)


def psnr(a: Image.Image | np.ndarray, b: Image.Image | np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB; ``inf`` for identical images."""
    x, y = _as_array(a), _as_array(b)
    if x.shape != y.shape:
        raise ValueError(f"images differ in shape: {x.shape} vs {y.shape}")
    mse = float(np.mean((x - y) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(DATA_RANGE**2 / mse)


def max_abs_diff(a: Image.Image | np.ndarray, b: Image.Image | np.ndarray) -> int:
    """Largest difference of one channel value, in uint8 levels."""
    return int(np.abs(_as_array(a) - _as_array(b)).max())


def _gaussian_window(size: int, sigma: float) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    return torch.outer(g, g)


def ssim(a: Image.Image | np.ndarray, b: Image.Image | np.ndarray) -> float:
    """Mean structural similarity of two RGB images (1.0 when identical)."""
    x, y = _as_array(a), _as_array(b)
    if x.shape != y.shape:
        raise ValueError(f"images differ in shape: {x.shape} vs {y.shape}")
    if x.ndim == 2:
        x, y = x[..., None], y[..., None]
    size = min(SSIM_WINDOW, x.shape[0], x.shape[1])
    size -= 1 - size % 2  # odd window even for tiny images
    channels = x.shape[2]
    window = _gaussian_window(size, SSIM_SIGMA).expand(channels, 1, size, size).contiguous()
    tx = torch.from_numpy(x).permute(2, 0, 1)[None]
    ty = torch.from_numpy(y).permute(2, 0, 1)[None]

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, window, groups=channels)

    mu_x, mu_y = blur(tx), blur(ty)
    var_x = blur(tx * tx) - mu_x**2
    var_y = blur(ty * ty) - mu_y**2
    cov = blur(tx * ty) - mu_x * mu_y
    c1, c2 = (SSIM_K1 * DATA_RANGE) ** 2, (SSIM_K2 * DATA_RANGE) ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return float(s.mean())


def load_scorer(spec: str) -> Scorer:
    """Import ``module:function`` and return the function."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"{spec!r} is not of the form module:function")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"cannot import {module_name!r}: {exc}") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"{module_name!r} has no function {attr!r}")
    return fn
