"""load_upscaler with spandrel on the CPU: weights built by the test (Real-ESRGAN
Compact), loaded from .pth and .safetensors, run batched.

Skipped where spandrel cannot be imported (CI: no torchvision build matches its
CPU torch); tests/gpu/test_upscale_gpu.py covers the GPU.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.sr_models import levels, picture, spandrel_or_skip, write_compact

spandrel = spandrel_or_skip()

from imagegenx.upscale import ModelUpscaler, UpscalerError, load_upscaler  # noqa: E402


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    d = tmp_path_factory.mktemp("sr")
    return {2: write_compact(d / "compact-x2.pth", 2), 4: write_compact(d / "compact-x4.safetensors", 4)}


@pytest.mark.parametrize("scale", [2, 4])
def test_loads_the_built_weights(weights: dict[int, Path], scale: int) -> None:
    up = load_upscaler(weights[scale], "cpu", "fp32")
    assert isinstance(up, ModelUpscaler) and up.runs_on_device
    assert (up.scale, up.device.type, up.dtype) == (scale, "cpu", torch.float32)


@pytest.mark.parametrize("scale", [2, 4])
def test_sizes_for_every_factor(weights: dict[int, Path], scale: int) -> None:
    up = load_upscaler(weights[scale], "cpu", "fp32")
    images = [picture(24, 16, 0), picture(16, 24, 1), picture(24, 16, 2)]
    out = up.upscale(images, [2, 4, 1])
    assert [im.size for im in out] == [(48, 32), (64, 96), (24, 16)]
    assert out[2] is images[2]


def test_batched_equals_alone_and_the_model_itself(weights: dict[int, Path]) -> None:
    up = load_upscaler(weights[2], "cpu", "fp32")
    images = [picture(24, 16, i) for i in range(4)]
    batched = up.upscale(images, [2] * 4)
    for image, together in zip(images, batched):
        (alone,) = up.upscale([image], [2])
        assert levels(together, alone).max() <= 1
        x = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)[None].float() / 255
        direct = (up.model(x)[0].clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        assert np.abs(np.asarray(together).astype(int) - direct.astype(int)).max() <= 1


def test_not_a_weights_file_is_a_clear_error(tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.pth"
    torch.save({"foo.weight": torch.zeros(3, 3)}, bogus)
    with pytest.raises(UpscalerError, match="unsupported architecture") as err:
        load_upscaler(bogus, "cpu", "fp32")
    assert "\n" not in str(err.value)


def test_a_x1_model_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UpscalerError, match="not super-resolution"):
        load_upscaler(write_compact(tmp_path / "x1.pth", 1), "cpu", "fp32")
