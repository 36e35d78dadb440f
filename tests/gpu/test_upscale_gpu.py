"""The super-resolution upscaler on a CUDA GPU, loaded through spandrel from
weights the test builds (Real-ESRGAN Compact, random, .pth and .safetensors).

Needs a CUDA GPU and spandrel (``pip install '.[upscale]'``; it imports
torchvision). Half precision rounds differently with the batch size and
against the CPU, so images are compared in uint8 levels with small tolerances;
a wrong row, order or scale changes them by tens of levels.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.sr_models import levels, picture, spandrel_or_skip, write_compact

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

if torch.cuda.is_available():
    spandrel = spandrel_or_skip()

from imagegenx.upscale import ModelUpscaler, load_upscaler  # noqa: E402

BATCH_MAX = 2  # uint8 levels: batched against alone, same device and dtype
CPU_MEAN, CPU_MAX = 0.5, 4  # uint8 levels: GPU half precision against CPU fp32


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    d = tmp_path_factory.mktemp("sr")
    return {2: write_compact(d / "compact-x2.safetensors", 2, num_feat=16, num_conv=4),
            4: write_compact(d / "compact-x4.pth", 4, num_feat=16, num_conv=4)}


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
@pytest.mark.parametrize("scale", [2, 4])
def test_sizes_batching_and_cpu_agreement(weights: dict[int, Path], scale: int, dtype: str) -> None:
    gpu = load_upscaler(weights[scale], "cuda", dtype)
    cpu = load_upscaler(weights[scale], "cpu", "fp32")
    assert isinstance(gpu, ModelUpscaler) and gpu.device.type == "cuda" and gpu.scale == scale
    images = [picture(64, 48, i) for i in range(5)] + [picture(48, 64, 9)]
    factors = [2, 4, 2, 4, 2, 2]
    out = gpu.upscale(images, factors)
    assert [im.size for im in out] == [(im.width * f, im.height * f) for im, f in zip(images, factors)]
    reference = cpu.upscale(images, factors)
    for i, (image, factor) in enumerate(zip(images, factors)):
        (alone,) = gpu.upscale([image], [factor])
        assert levels(out[i], alone).max() <= BATCH_MAX, i
        d = levels(out[i], reference[i])
        assert d.mean() <= CPU_MEAN and d.max() <= CPU_MAX, (i, d.mean(), d.max())


def test_chunks_equal_one_call(weights: dict[int, Path]) -> None:
    whole = load_upscaler(weights[2], "cuda", "fp16")
    chunked = load_upscaler(weights[2], "cuda", "fp16", max_pixels=2 * 128 * 96)  # two per call
    images = [picture(64, 48, i) for i in range(5)]
    for a, b in zip(whole.upscale(images, [2] * 5), chunked.upscale(images, [2] * 5)):
        assert levels(a, b).max() <= BATCH_MAX


def test_auto_means_the_gpu_in_half_precision(weights: dict[int, Path]) -> None:
    up = load_upscaler(weights[4], "auto", "auto")
    assert isinstance(up, ModelUpscaler)
    assert (up.device.type, up.dtype) == ("cuda", torch.float16)
    assert next(up.model.model.parameters()).dtype == torch.float16
