"""INT8 SmoothQuant of the trained shapes model keeps what the pictures show.

Calibrated on a few of the shipped shapes calibration prompts (training captions),
judged on held-out prompts at 20 steps against the fp32 reference: the scorer
must read the same colours and shapes, and the pixels must stay close. The full
figures (200 prompts, all 80 calibration prompts, INT8 and FP8) are in
docs/BENCHMARKS.md section 8.
"""
from __future__ import annotations

import os
import statistics

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("modelopt.torch.quantization", reason="nvidia-modelopt is not installed")

from imagegenx.engine.diffusion import DiffusionEngine  # noqa: E402
from imagegenx.shapes.model_files import SHAPES_MODEL  # noqa: E402
from imagegenx.shapes.scorer import prompt_accuracy  # noqa: E402
from optimize.calibration import capture, load_prompts  # noqa: E402
from optimize.choices import PROMPT_FILES  # noqa: E402
from optimize.quality import psnr, ssim  # noqa: E402
from optimize.quantize import quantize_unet  # noqa: E402
from optimize.verify import RunSettings, draw, evaluation_set  # noqa: E402

RUN = RunSettings(num_images=8, steps=20, sampler="euler", guidance=7.5, seed=0, batch=8)


def test_int8_draws_the_same_scenes_as_fp32() -> None:
    prompts = evaluation_set("shapes", RUN.num_images)
    reference, _, _ = draw(DiffusionEngine.load(SHAPES_MODEL, device="cpu", dtype="fp32"), prompts, RUN)

    engine = DiffusionEngine.load(SHAPES_MODEL, device="cpu", dtype="fp32")
    calibration = capture(engine, load_prompts(PROMPT_FILES["shapes"])[:8], steps=20, every=4, batch_size=8)
    report = quantize_unet(engine.unet, calibration, "int8")
    assert report.enabled > 0 and report.skipped_layers
    quantized, _, _ = draw(engine, prompts, RUN)

    ref_acc, int8_acc = prompt_accuracy(reference, prompts), prompt_accuracy(quantized, prompts)
    print("fp32:", ref_acc, "\nint8:", int8_acc)
    assert ref_acc["colours"] == 1.0 and ref_acc["shape"] == 1.0
    assert int8_acc["colours"] == 1.0 and int8_acc["shape"] == 1.0
    psnrs = [psnr(a, b) for a, b in zip(reference, quantized)]
    ssims = [ssim(a, b) for a, b in zip(reference, quantized)]
    print("PSNR dB:", [round(p, 1) for p in psnrs], "SSIM:", [round(s, 4) for s in ssims])
    assert statistics.median(psnrs) > 30 and statistics.median(ssims) > 0.95
