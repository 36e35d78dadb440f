"""Upscalers (imagegenx/upscale.py) without spandrel: Lanczos, and the batched
model path driven by a small fixed-weight torch module.

The module is a 3x3 convolution that copies each pixel into scale x scale
sub-pixel channels, then PixelShuffle: exactly nearest-neighbour enlargement,
so every expected output is known to the last uint8 level.
"""
from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from imagegenx.upscale import (
    LanczosUpscaler,
    ModelUpscaler,
    Upscaler,
    UpscalerError,
    groups,
    load_upscaler,
)


class NearestSR(torch.nn.Module):
    """Conv + PixelShuffle with fixed weights: nearest-neighbour x``scale``.
    Records the shape and dtype of every batch it sees."""

    def __init__(self, scale: int = 2, gain: float = 1.0, offset: float = 0.0) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 3 * scale * scale, 3, padding=1)
        weight = torch.zeros(3 * scale * scale, 3, 3, 3)
        for c in range(3):
            weight[c * scale * scale:(c + 1) * scale * scale, c, 1, 1] = gain
        with torch.no_grad():
            self.conv.weight.copy_(weight)
            self.conv.bias.fill_(offset)
        self.shuffle = torch.nn.PixelShuffle(scale)
        self.calls: list[tuple[tuple[int, ...], torch.dtype]] = []
        self.contiguous: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append((tuple(x.shape), x.dtype))
        self.contiguous.append(x.is_contiguous())
        return self.shuffle(self.conv(x))


def picture(w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


def nearest(image: Image.Image, factor: int) -> Image.Image:
    return image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST)


def same(a: Image.Image, b: Image.Image) -> bool:
    return a.size == b.size and np.array_equal(np.asarray(a), np.asarray(b))


def model_upscaler(scale: int = 2, max_pixels: int = 10**9, dtype: torch.dtype = torch.float32,
                   **kw: float) -> tuple[ModelUpscaler, NearestSR]:
    module = NearestSR(scale, **kw).to(dtype).eval()
    return ModelUpscaler(module, scale, "cpu", dtype, max_pixels=max_pixels), module


# -- grouping and Lanczos ------------------------------------------------------

def test_groups_by_size_and_factor_in_input_order() -> None:
    images = [picture(16, 8, 0), picture(8, 8, 1), picture(16, 8, 2), picture(16, 8, 3), picture(8, 8, 4)]
    assert groups(images, [2, 2, 2, 4, 1]) == {((16, 8), 2): [0, 2], ((8, 8), 2): [1], ((16, 8), 4): [3]}


@pytest.mark.parametrize("factors", [[2], [2, 0], [2, True], [2, 2.0]])
def test_bad_factors_are_refused(factors: list) -> None:  # type: ignore[type-arg]
    with pytest.raises(ValueError):
        LanczosUpscaler().upscale([picture(8, 8, 0), picture(8, 8, 1)], factors)


def test_lanczos_sizes_order_and_identity() -> None:
    images = [picture(16, 8, 0), picture(8, 8, 1), picture(16, 8, 2), picture(24, 16, 3)]
    out = LanczosUpscaler().upscale(images, [2, 1, 4, 2])
    assert [im.size for im in out] == [(32, 16), (8, 8), (64, 32), (48, 32)]
    assert out[1] is images[1]
    assert same(out[0], images[0].resize((32, 16), Image.Resampling.LANCZOS))
    assert same(out[2], images[2].resize((64, 32), Image.Resampling.LANCZOS))


def test_lanczos_with_an_executor_equals_sequential() -> None:
    images = [picture(32, 16, i) for i in range(6)]
    factors = [2, 4, 1, 2, 4, 2]
    with ThreadPoolExecutor(3) as pool:
        parallel = LanczosUpscaler(pool).upscale(images, factors)
    sequential = LanczosUpscaler().upscale(images, factors)
    assert all(same(a, b) for a, b in zip(parallel, sequential))


def test_both_satisfy_the_protocol() -> None:
    assert isinstance(LanczosUpscaler(), Upscaler)
    assert isinstance(model_upscaler()[0], Upscaler)
    assert not LanczosUpscaler.runs_on_device and ModelUpscaler.runs_on_device


# -- the model path --------------------------------------------------------------

def test_one_forward_per_group_and_exact_results() -> None:
    up, module = model_upscaler(2)
    images = [picture(16, 8, i) for i in range(5)]
    out = up.upscale(images, [2] * 5)
    assert [shape for shape, _ in module.calls] == [(5, 3, 8, 16)]
    assert module.contiguous == [True]  # NCHW, as models that view() their input need
    assert all(same(o, nearest(i, 2)) for o, i in zip(out, images))


def test_mixed_sizes_and_factors_keep_input_order() -> None:
    up, module = model_upscaler(2)
    a = [picture(16, 8, i) for i in range(3)]
    b = [picture(8, 16, 10 + i) for i in range(2)]
    images = [a[0], b[0], a[1], b[1], a[2]]
    factors = [2, 2, 1, 4, 2]
    out = up.upscale(images, factors)
    # (16x8, x2): a[0], a[2] in one call; (8x16, x2): b[0]; (8x16, x4): b[1] in two passes.
    assert sorted(shape for shape, _ in module.calls) == sorted(
        [(2, 3, 8, 16), (1, 3, 16, 8), (1, 3, 16, 8), (1, 3, 32, 16)])
    assert out[2] is images[2]
    for o, im, f in zip(out, images, factors):
        assert same(o, nearest(im, f))


def test_chunks_fit_the_pixel_budget() -> None:
    per_image = 16 * 8 * 4  # output pixels of one 16x8 image at x2
    up, module = model_upscaler(2, max_pixels=2 * per_image + 1)
    images = [picture(16, 8, i) for i in range(5)]
    out = up.upscale(images, [2] * 5)
    assert [shape[0] for shape, _ in module.calls] == [2, 2, 1]
    assert all(same(o, nearest(i, 2)) for o, i in zip(out, images))


def test_an_image_over_the_budget_runs_alone() -> None:
    up, module = model_upscaler(2, max_pixels=10)
    images = [picture(16, 8, i) for i in range(2)]
    up.upscale(images, [2, 2])
    assert [shape[0] for shape, _ in module.calls] == [1, 1]


def test_budget_counts_every_pass() -> None:
    up, module = model_upscaler(2, max_pixels=16 * 8 * 16)  # one 16x8 image at x4
    up.upscale([picture(16, 8, i) for i in range(2)], [4, 4])
    assert [shape for shape, _ in module.calls] == [(1, 3, 8, 16), (1, 3, 16, 32)] * 2


@pytest.mark.parametrize(("scale", "factor", "passes"),
                         [(2, 2, 1), (2, 4, 2), (4, 2, 1), (4, 4, 1), (3, 4, 1)])
def test_passes(scale: int, factor: int, passes: int) -> None:
    assert model_upscaler(scale)[0].passes(factor) == passes


def test_a_x2_model_runs_twice_for_x4() -> None:
    up, module = model_upscaler(2)
    image = picture(16, 8, 0)
    (out,) = up.upscale([image], [4])
    assert len(module.calls) == 2 and same(out, nearest(image, 4))


def test_a_x4_model_for_x2_is_resized_to_the_exact_size() -> None:
    up, module = model_upscaler(4)
    image = picture(16, 8, 0)
    (out,) = up.upscale([image], [2])
    assert len(module.calls) == 1 and out.size == (32, 16)
    assert same(out, nearest(image, 4).resize((32, 16), Image.Resampling.LANCZOS))


def test_output_is_clamped() -> None:
    up, _ = model_upscaler(2, gain=3.0, offset=-1.0)  # values far outside [0, 1]
    image = picture(16, 8, 0)
    (out,) = up.upscale([image], [2])
    expected = np.clip(np.asarray(nearest(image, 2)).astype(np.float64) / 255 * 3 - 1, 0, 1)
    assert np.abs(np.asarray(out).astype(np.float64) - np.round(expected * 255)).max() <= 1
    assert {0, 255} <= set(np.unique(np.asarray(out)).tolist())


def test_nan_becomes_black() -> None:
    class Nan(NearestSR):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x) * float("nan")

    up = ModelUpscaler(Nan(2), 2, "cpu", torch.float32)
    (out,) = up.upscale([picture(8, 8, 0)], [2])
    assert not np.asarray(out).any()


def test_runs_in_the_given_dtype() -> None:
    up, module = model_upscaler(2, dtype=torch.bfloat16)
    images = [picture(16, 8, i) for i in range(2)]
    out = up.upscale(images, [2, 2])
    assert [dtype for _, dtype in module.calls] == [torch.bfloat16]
    # Pixel values k/255 pass through bf16 with at most one level of rounding.
    for o, i in zip(out, images):
        diff = np.abs(np.asarray(o).astype(int) - np.asarray(nearest(i, 2)).astype(int))
        assert diff.max() <= 1


def test_non_rgb_input_is_converted() -> None:
    up, _ = model_upscaler(2)
    image = picture(8, 8, 0)
    (out,) = up.upscale([image.convert("RGBA")], [2])
    assert out.mode == "RGB" and same(out, nearest(image, 2))


def test_a_model_of_the_wrong_shape_is_reported() -> None:
    up = ModelUpscaler(NearestSR(4), 2, "cpu", torch.float32)  # claims x2, gives x4
    with pytest.raises(RuntimeError, match=r"expected \(1, 3, 16, 16\)"):
        up.upscale([picture(8, 8, 0)], [2])


def test_a_scale_below_two_is_refused() -> None:
    with pytest.raises(ValueError, match="scale 1"):
        ModelUpscaler(torch.nn.Identity(), 1, "cpu", torch.float32)


# -- loading ---------------------------------------------------------------------

def test_no_model_means_lanczos() -> None:
    assert isinstance(load_upscaler(""), LanczosUpscaler)


def test_wrong_suffix_and_missing_file_are_one_line_errors(tmp_path: Path) -> None:
    (tmp_path / "w.onnx").write_bytes(b"x")
    with pytest.raises(UpscalerError, match=r"^upscaler_model \(IMAGEGENX_UPSCALER_MODEL\) .*\.pth or "
                                            r"\.safetensors") as err:
        load_upscaler(tmp_path / "w.onnx")
    assert "\n" not in str(err.value)
    with pytest.raises(UpscalerError, match="no such file"):
        load_upscaler(tmp_path / "absent.pth")


def test_missing_spandrel_names_the_setting_and_the_extra(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    weights = tmp_path / "x2.pth"
    torch.save(NearestSR(2).state_dict(), weights)
    monkeypatch.setitem(sys.modules, "spandrel", None)  # import spandrel raises ImportError
    with pytest.raises(UpscalerError) as err:
        load_upscaler(weights, "cpu", "fp32")
    message = str(err.value)
    assert "upscaler_model" in message and "imagegenx[upscale]" in message and "\n" not in message
