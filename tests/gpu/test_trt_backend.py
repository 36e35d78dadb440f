"""TensorRT: engine build from the exported UNet and the ``trt`` UNet backend.

Needs TensorRT 10+ and a CUDA GPU. No machine this project has been tested on
has TensorRT (README, "What has been exercised"), so these tests skip with that
reason everywhere so far; they are written to run where TensorRT exists.

Tolerance: the engine and PyTorch both run the tiny UNet in fp16, with
different kernels: max|trt - torch| <= 1e-2 + 1e-2 x max|torch| (the fp16
tolerance of optimize.onnx_check).
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from optimize.trt_common import TRT_MISSING_REASON

trt = pytest.importorskip("tensorrt", reason=TRT_MISSING_REASON)

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from imagegenx.engine.base import BatchSpec, Sample  # noqa: E402
from imagegenx.engine.diffusion import DiffusionEngine  # noqa: E402
from optimize.export import example_inputs, export_components  # noqa: E402
from optimize.onnx_check import TOLERANCES  # noqa: E402
from optimize.quality import psnr  # noqa: E402
from optimize.trt_backend import TrtUNet, attach_trt_unet  # noqa: E402
from optimize.trt_build import BuildOptions, build_engine  # noqa: E402
from optimize.trt_common import BatchOutsideProfile, profile_for_buckets  # noqa: E402

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
BUCKETS = [1, 2, 4]  # images: the profile covers 2..8 UNet rows


@pytest.fixture(scope="module")
def engine(tiny_model: Path) -> DiffusionEngine:
    return DiffusionEngine.load(tiny_model, device="cuda", dtype="fp16")


@pytest.fixture(scope="module")
def plan(engine: DiffusionEngine, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("trt")
    [onnx] = export_components(engine, out, ["unet"], exporter="torchscript")
    cache = out / "timing.cache"
    report = build_engine(onnx.path, out / "unet.plan", BuildOptions(profile_for_buckets(BUCKETS), workspace_gib=2,
                                                                     timing_cache=cache))
    assert report.engine.stat().st_size > 0 and cache.stat().st_size > 0
    assert report.input_shapes["sample"][2][0] == 8
    return report.engine


def test_engine_matches_pytorch_inside_the_profile(engine: DiffusionEngine, plan: Path) -> None:
    unet = TrtUNet.load(plan, config=engine.unet.config, device="cuda")
    tol = TOLERANCES[torch.float16]
    for rows in (2, 6):
        sample, t, ctx = example_inputs("unet", engine, rows)
        with torch.no_grad():
            ref = engine.unet(sample, t, encoder_hidden_states=ctx).sample.float()
        got = unet(sample, t, encoder_hidden_states=ctx).sample.float()
        torch.cuda.synchronize()
        err = float((got - ref).abs().max())
        assert tol.allows(err, float(ref.abs().max())), (rows, err)


def test_batch_outside_the_profile_is_refused(engine: DiffusionEngine, plan: Path) -> None:
    unet = TrtUNet.load(plan, config=engine.unet.config, device="cuda")
    sample, t, ctx = example_inputs("unet", engine, 10)
    with pytest.raises(BatchOutsideProfile, match="10 rows"):
        unet(sample, t, encoder_hidden_states=ctx)


def test_engine_draws_what_pytorch_draws(tiny_model: Path, plan: Path) -> None:
    spec = BatchSpec(width=64, height=64, steps=10, sampler="euler",
                     samples=tuple(Sample(prompt="a red circle", seed=s) for s in (1, 2)))
    ref = DiffusionEngine.load(tiny_model, device="cuda", dtype="fp16").generate(spec)
    served = DiffusionEngine.load(tiny_model, device="cuda", dtype="fp16")
    attach_trt_unet(served, plan)
    for a, b in zip(ref, served.generate(spec)):
        assert psnr(a, b) > 30
