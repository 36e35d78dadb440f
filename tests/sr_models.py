"""Super-resolution weights the tests build themselves: spandrel's Real-ESRGAN
Compact architecture (SRVGGNetCompact), small and randomly initialised, so no
model is downloaded."""
from __future__ import annotations

from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
from PIL import Image

NO_SPANDREL = ("spandrel needs torchvision, which has no build for the CPU torch used here; "
               "run on a GPU machine")


def spandrel_or_skip() -> ModuleType:
    """spandrel, or a module-level skip: it may be absent, or present with a
    torchvision that fails at import (a RuntimeError, which importorskip lets through)."""
    try:
        import spandrel
    except Exception as exc:  # noqa: BLE001
        first = (str(exc).strip().splitlines() or [""])[0]
        pytest.skip(f"{NO_SPANDREL} ({type(exc).__name__}: {first})", allow_module_level=True)
    return spandrel


def write_compact(path: Path, scale: int, *, num_feat: int = 8, num_conv: int = 2, seed: int = 0) -> Path:
    """Random Compact weights of ``scale`` as .pth (torch.save) or .safetensors."""
    from spandrel.architectures.Compact import Compact

    torch.manual_seed(seed)
    model = Compact(num_in_ch=3, num_out_ch=3, num_feat=num_feat, num_conv=num_conv, upscale=scale)
    with torch.no_grad():  # a small residual over the nearest-upscaled input: outputs stay in range
        last = model.body[-1]
        last.weight.mul_(0.05)
        last.bias.zero_()
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save(state, path)
    return path


def picture(w: int, h: int, seed: int) -> Image.Image:
    """A smooth RGB image with some detail: gradients plus noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x / max(w - 1, 1), y / max(h - 1, 1), (x + y) / max(w + h - 2, 1)], axis=-1)
    pixels = np.clip(base * 200 + rng.normal(0, 20, (h, w, 3)) + 20, 0, 255)
    return Image.fromarray(pixels.astype(np.uint8), "RGB")


def levels(a: Image.Image, b: Image.Image) -> np.ndarray:
    """Absolute differences in uint8 levels of two images of one size."""
    assert a.size == b.size, (a.size, b.size)
    return np.abs(np.asarray(a).astype(np.int16) - np.asarray(b).astype(np.int16))
