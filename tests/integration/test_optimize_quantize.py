"""ModelOpt quantization of the tiny UNet: INT8 SmoothQuant and FP8 fake quant
in plain PyTorch on the CPU, the recipe's skip list, save/restore, quality
against the fp32 reference on fixed seeds, and the Q/DQ ONNX export.

The tiny model has random weights, so its PSNR says only that the quantized
path runs and stays close; the trained model's numbers come from
``imagegenx optimize verify`` with a scorer.
"""
from __future__ import annotations

import collections
import math
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("modelopt.torch.quantization", reason="nvidia-modelopt is not installed")

import onnx  # noqa: E402

from imagegenx.engine.base import BatchSpec, Sample  # noqa: E402
from imagegenx.engine.diffusion import DiffusionEngine  # noqa: E402
from optimize.calibration import CalibrationSet, capture  # noqa: E402
from optimize.export import export_components  # noqa: E402
from optimize.quality import psnr, ssim  # noqa: E402
from optimize.quantize import (  # noqa: E402
    fp8_fake_quant_available,
    is_skipped,
    quantize_unet,
    quantizers,
    restore_state,
    save_state,
)

SEEDS = (11, 12)
STEPS = 3  # fake quantization is slow on the CPU; enough steps to compare images


def _draw(engine: DiffusionEngine) -> list:
    w, h = engine.native_size
    samples = tuple(Sample(prompt="a blue triangle on a yellow background", seed=s) for s in SEEDS)
    return engine.generate(BatchSpec(width=w, height=h, steps=STEPS, sampler="euler", samples=samples))


@pytest.fixture(scope="module")
def calibration(tiny_model: Path) -> CalibrationSet:
    engine = DiffusionEngine.load(tiny_model, device="cpu", dtype="fp32")
    prompts = ["a red circle on a blue background", "a photo of a cat", "a snowy mountain at sunrise",
               "a green square"]
    return capture(engine, prompts, steps=3, every=1, batch_size=4)


@pytest.fixture(scope="module")
def reference(tiny_model: Path) -> list:
    return _draw(DiffusionEngine.load(tiny_model, device="cpu", dtype="fp32"))


@pytest.fixture(scope="module")
def int8_engine(tiny_model: Path, calibration: CalibrationSet) -> DiffusionEngine:
    engine = DiffusionEngine.load(tiny_model, device="cpu", dtype="fp32")
    report = quantize_unet(engine.unet, calibration, "int8")
    assert report.calibration_calls == len(calibration) == 3
    assert report.enabled > 0 and report.skipped_layers
    return engine


def test_int8_skips_the_recipes_layers_and_stays_close(int8_engine: DiffusionEngine, reference: list) -> None:
    states = {name: q.is_enabled for name, q in quantizers(int8_engine.unet)}
    for name in ("conv_in.input_quantizer", "conv_out.weight_quantizer",
                 "time_embedding.linear_1.weight_quantizer", "down_blocks.0.resnets.0.time_emb_proj.input_quantizer"):
        assert states[name] is False, name
    assert not any(on for name, on in states.items() if is_skipped(name))
    assert states["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.input_quantizer"]
    assert states["down_blocks.0.resnets.0.conv1.weight_quantizer"]

    images = _draw(int8_engine)
    scores = [(psnr(a, b), ssim(a, b)) for a, b in zip(reference, images)]
    print("int8 vs fp32 (PSNR dB, SSIM):", [(round(p, 2), round(s, 4)) for p, s in scores])
    for p, s in scores:
        assert math.isfinite(p) and 15 < p  # quantization changes pixels, but not into noise
        assert 0.5 < s < 1


def test_quantized_state_saves_and_restores(int8_engine: DiffusionEngine, tiny_model: Path, tmp_path: Path) -> None:
    path = tmp_path / "unet.int8.modelopt.pth"
    save_state(int8_engine.unet, path)
    fresh = DiffusionEngine.load(tiny_model, device="cpu", dtype="fp32")
    restore_state(fresh.unet, path)
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([500.0, 500.0]), torch.randn(2, 77, 32)
    with torch.no_grad():
        expected = int8_engine.unet(x, t, encoder_hidden_states=ctx).sample
        assert torch.equal(fresh.unet(x, t, encoder_hidden_states=ctx).sample, expected)


def test_int8_qdq_onnx_has_quantize_dequantize_nodes(int8_engine: DiffusionEngine, tmp_path: Path) -> None:
    [r] = export_components(int8_engine, tmp_path, ["unet"], exporter="torchscript", suffix=".int8")
    ops = collections.Counter(n.op_type for n in onnx.load(str(r.path)).graph.node)
    print("int8 Q/DQ nodes:", ops["QuantizeLinear"], ops["DequantizeLinear"])
    assert ops["QuantizeLinear"] > 0 and ops["DequantizeLinear"] > 0


def test_fp8_fake_quant_runs_on_the_cpu(tiny_model: Path, calibration: CalibrationSet) -> None:
    ok, reason = fp8_fake_quant_available("cpu")
    if not ok:
        pytest.skip(reason)
    engine = DiffusionEngine.load(tiny_model, device="cpu", dtype="fp32")
    sample, t, ctx = next(calibration.inputs())
    with torch.no_grad():
        expected = engine.unet(sample, t, encoder_hidden_states=ctx).sample
    report = quantize_unet(engine.unet, calibration, "fp8", limit=2)
    assert report.calibration_calls == 2
    assert not engine.unet.conv_in.input_quantizer.is_enabled
    assert engine.unet.down_blocks[0].resnets[0].conv1.input_quantizer.is_enabled
    with torch.no_grad():
        got = engine.unet(sample, t, encoder_hidden_states=ctx).sample
    rel = float((got - expected).abs().max() / expected.abs().max())
    print(f"fp8 vs fp32 UNet output: max error {rel:.3f} of the largest value")
    assert 0 < rel < 0.25  # E4M3 keeps 3 mantissa bits: a few percent, not noise
