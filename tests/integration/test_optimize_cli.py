"""`imagegenx optimize verify` on the tiny model: a table, JSON, a scorer, and
errors that name the option."""
from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from click.testing import CliRunner
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from imagegenx.cli import main  # noqa: E402


def red_share(images: Sequence[Image.Image], prompts: Sequence[str]) -> dict[str, float]:
    """A stand-in scorer: how red the images are on average."""
    reds = [sum(px[0] for px in img.getdata()) / (255 * img.width * img.height) for img in images]
    return {"red": sum(reds) / len(reds)}


def test_verify_prints_a_table_and_writes_json(tiny_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "verify.json"
    result = CliRunner().invoke(main, [
        "optimize", "verify", "torch-fp32", "onnx", "--model", str(tiny_model), "--device", "cpu",
        "--num-images", "2", "--steps", "3", "--exporter", "torchscript",
        "--scorer", f"{__name__}:red_share", "--json", str(out),
    ])
    assert result.exit_code == 0, result.output
    print(result.output)
    assert "torch-fp32 vs onnx" in result.output
    for column in ("PSNR dB", "SSIM", "max|diff|", "s/image", "red"):
        assert column in result.output
    report = json.loads(out.read_text())
    assert report["a"] == "torch-fp32" and report["b"] == "onnx" and len(report["images"]) == 2
    assert report["max_abs_diff"] <= 2  # onnxruntime fp32 matches PyTorch to rounding
    assert set(report["seconds_per_image"]) == {"torch-fp32", "onnx"}
    assert set(report["scores"]["onnx"]) == {"red"}


def test_verify_errors_name_the_option(tiny_model: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    base = ["optimize", "verify", "--model", str(tiny_model)]
    cats = tmp_path / "cats.txt"
    cats.write_text("a photo of a cat\n")
    cases = [
        (["torch-fp32", "torch-fp32", "--prompts", str(cats), "--num-images", "1", "--steps", "1",
          "--scorer", "imagegenx.shapes.scorer:prompt_accuracy"], "'--scorer': no prompt is in the shapes grammar"),
        (["torch-fp32", "tensorrt"], "BACKEND_B"),
        (["torch-fp32", "onnx", "--num-images", "0"], "--num-images"),
        (["torch-fp32", "onnx", "--sampler", "heun"], "--sampler"),
        (["torch-fp32", "onnx", "--scorer", "not-a-spec"], "--scorer"),
        (["torch-fp32", "onnx", "--device", "cuda"] if not _has_cuda() else ["torch-fp32", "trt"], "--"),
    ]
    for args, option in cases:
        result = runner.invoke(main, base[:2] + args + base[2:])
        assert result.exit_code == 2, (args, result.output)
        assert option in result.output, (args, result.output)


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()
