"""Pure logic of the optimize package: TensorRT profiles and batch checks, build
progress, the quantization skip list, image metrics, settings and CLI errors.
None of it needs TensorRT, a GPU or a model."""
from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from click.testing import CliRunner
from pydantic import ValidationError

from imagegenx.cli import main
from imagegenx.settings import Settings
from imagegenx.shapes.captions import evaluation_prompts, held_out_triplets, parse
from optimize.calibration import load_prompts
from optimize.choices import PROMPT_FILES
from optimize.export import EXTERNAL_DATA_THRESHOLD, needs_external_data
from optimize.quality import load_scorer, max_abs_diff, psnr, ssim
from optimize.quantize import SKIPPED_LAYERS, is_skipped
from optimize.verify import EVAL_PROMPTS, evaluation_set
from optimize.trt_common import (
    TRT_MISSING_REASON,
    BatchOutsideProfile,
    BatchProfile,
    PhaseProgress,
    profile_for_buckets,
    tensorrt_available,
    torch_dtype,
)


@pytest.fixture(autouse=True)
def _no_service_env(clean_env: None) -> None:
    """Settings come from the code defaults only."""


# TensorRT profiles and the batch check -------------------------------------------------

def test_profile_covers_the_worker_buckets_doubled_for_cfg() -> None:
    p = profile_for_buckets([1, 2, 4, 8, 16, 32])
    # One row per image at least: an image outside its guidance interval runs its conditional row only.
    assert (p.min_rows, p.opt_rows, p.max_rows) == (1, 16, 64)
    assert profile_for_buckets([1, 2, 4], opt_images=4).opt_rows == 8
    assert profile_for_buckets([1, 8], rows_per_image=1).max_rows == 8  # VAE / text encoder


def test_profile_rejects_bad_buckets_and_opt() -> None:
    with pytest.raises(ValueError, match="ascending"):
        profile_for_buckets([4, 2])
    with pytest.raises(ValueError, match="outside the buckets"):
        profile_for_buckets([1, 2, 4], opt_images=8)


def test_batch_outside_the_profile_is_a_clear_error() -> None:
    p = BatchProfile(2, 16, 64)
    p.check(2)
    p.check(64)
    with pytest.raises(BatchOutsideProfile) as exc:
        p.check(80)
    message = str(exc.value)
    assert "80 rows (40 images with CFG)" in message and "2 to 64 rows" in message
    assert "imagegenx optimize build" in message
    with pytest.raises(BatchOutsideProfile):
        BatchProfile(4, 8, 16).check(2)


def test_progress_bars_follow_nested_phases() -> None:
    bars: list[SimpleNamespace] = []

    def make_bar(**kw: object) -> SimpleNamespace:
        bar = SimpleNamespace(n=0, closed=False, refresh=lambda: None, **kw)
        bar.close = lambda: setattr(bar, "closed", True)
        bars.append(bar)
        return bar

    progress = PhaseProgress(make_bar)
    progress.phase_start("Building engine", None, 3)
    progress.phase_start("Tactic selection", "Building engine", 10)
    assert [b.position for b in bars] == [0, 1] and bars[1].leave is False
    assert progress.step_complete("Tactic selection", 4) is True
    assert bars[1].n == 5
    progress.phase_finish("Tactic selection")
    assert bars[1].closed and not bars[0].closed
    progress.cancelled = True
    assert progress.step_complete("Building engine", 0) is False  # asks TensorRT to stop


def test_tensorrt_types_map_to_torch() -> None:
    import torch

    assert torch_dtype(SimpleNamespace(name="HALF")) is torch.float16
    assert torch_dtype(SimpleNamespace(name="FLOAT")) is torch.float32
    with pytest.raises(TypeError):
        torch_dtype(SimpleNamespace(name="INT4"))


# Export, quantization skip list, prompts -----------------------------------------------

def test_external_data_past_protobufs_limit() -> None:
    sd15_unet_params = 859_520_964
    assert needs_external_data(sd15_unet_params * 4)  # fp32: 3.4 GB
    assert not needs_external_data(sd15_unet_params * 2)  # fp16: 1.7 GB fits
    assert EXTERNAL_DATA_THRESHOLD < 2 * 1024**3


def test_skip_list_matches_whole_layer_names() -> None:
    assert is_skipped("conv_in.input_quantizer")
    assert is_skipped("time_embedding.linear_1.weight_quantizer")
    assert is_skipped("down_blocks.0.resnets.1.time_emb_proj")
    assert is_skipped("up_blocks.1.resnets.0.conv_shortcut.weight_quantizer")
    assert not is_skipped("down_blocks.0.resnets.0.conv1.input_quantizer")
    assert not is_skipped("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q")
    assert {"time_embedding", "time_emb_proj", "conv_in", "conv_out", "conv_shortcut"} <= set(SKIPPED_LAYERS)


def test_shipped_calibration_prompts_are_many_and_varied() -> None:
    prompts = load_prompts()
    assert len(prompts) >= 64
    assert len(set(prompts)) == len(prompts)
    assert len({p.split()[1] for p in prompts if len(p.split()) > 1}) > 30  # not one template


def test_shapes_calibration_prompts_are_training_captions_apart_from_the_evaluation_set() -> None:
    prompts = load_prompts(PROMPT_FILES["shapes"])
    assert prompts == evaluation_prompts(80, held_out=False, seed=2024)  # regenerated as its header says
    assert len(set(prompts)) == len(prompts) >= 64
    scenes = [parse(p) for p in prompts]
    assert all(s is not None and s.triplet not in held_out_triplets() for s in scenes)
    assert len({s.triplet for s in scenes if s is not None}) > 40
    evaluation = evaluation_set("shapes", 200)
    assert evaluation == evaluation_prompts(200, held_out=True)
    assert not set(evaluation) & set(prompts)
    assert evaluation_set("general", 3) == list(EVAL_PROMPTS[:3])


# Image metrics ----------------------------------------------------------------------------

def test_psnr_ssim_and_max_difference() -> None:
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    assert psnr(a, a) == math.inf and ssim(a, a) == pytest.approx(1.0) and max_abs_diff(a, a) == 0
    b = a.astype(np.int16)
    b[::2] += 1
    b = np.clip(b, 0, 255).astype(np.uint8)
    mse = np.mean((a.astype(float) - b) ** 2)
    assert psnr(a, b) == pytest.approx(10 * math.log10(255**2 / mse))
    noisy = np.clip(a + rng.normal(0, 40, a.shape), 0, 255).astype(np.uint8)
    assert 0 < ssim(a, noisy) < ssim(a, b) < 1
    assert ssim(a, noisy) == pytest.approx(ssim(noisy, a))
    assert max_abs_diff(a, b) == 1


def test_scorer_is_module_colon_function() -> None:
    assert load_scorer("math:sqrt") is math.sqrt
    for bad in ("math", "math:", "no_such_module_xyz:f", "math:no_such_function"):
        with pytest.raises(ValueError):
            load_scorer(bad)


# Settings, engine start-up and CLI errors --------------------------------------------------

def test_trt_backend_needs_an_engine_file() -> None:
    assert Settings().unet_backend == "torch"
    with pytest.raises(ValidationError, match="IMAGEGENX_TRT_ENGINE"):
        Settings(unet_backend="trt")
    assert Settings(unet_backend="trt", trt_engine="var/trt/unet.plan").trt_engine == "var/trt/unet.plan"


@pytest.mark.skipif(tensorrt_available(), reason="TensorRT is installed here")
def test_trt_backend_without_tensorrt_fails_at_start_naming_the_setting(tmp_path: Path) -> None:
    from imagegenx.engine import create_engine
    from optimize.trt_backend import TrtBackendError

    with pytest.raises(TrtBackendError, match="IMAGEGENX_UNET_BACKEND"):
        create_engine("diffusion", tmp_path / "never-loaded", "cpu", "fp32", unet_backend="trt",
                      trt_engine=str(tmp_path / "unet.plan"))
    assert not (tmp_path / "never-loaded").exists()  # refused before any model was loaded


def test_build_errors_name_the_option(tmp_path: Path) -> None:
    graph = tmp_path / "unet.onnx"
    graph.write_bytes(b"")
    runner = CliRunner()
    result = runner.invoke(main, ["optimize", "build", "--onnx", str(graph), "--buckets", "4,2"])
    assert result.exit_code == 2 and "--buckets" in result.output
    result = runner.invoke(main, ["optimize", "build", "--onnx", str(graph), "--buckets", "1,2", "--opt", "4"])
    assert result.exit_code == 2 and "--opt" in result.output
    if not tensorrt_available():
        result = runner.invoke(main, ["optimize", "build", "--onnx", str(graph), "--buckets", "1,2"])
        assert result.exit_code == 1 and "TensorRT cannot be imported" in result.output


def test_a_bad_model_setting_is_a_one_line_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMAGEGENX_MODEL", str(tmp_path / "absent.safetensors"))
    result = CliRunner().invoke(main, ["optimize", "calibrate", "--device", "cpu", "-o", str(tmp_path / "c.pt")])
    assert result.exit_code == 1 and "absent.safetensors" in result.output
    assert "Traceback" not in result.output


def test_backends_refuse_what_cannot_run_here(tmp_path: Path) -> None:
    from optimize.backends import BackendError, BackendOptions, make_engine

    opts = BackendOptions(model=tmp_path, device="cpu", workdir=tmp_path)
    with pytest.raises(BackendError, match="CUDA"):
        make_engine("torch-fp16", opts)
    if not tensorrt_available():
        with pytest.raises(BackendError, match="TensorRT"):
            make_engine("trt", opts)


def test_skip_reason_is_the_documented_one() -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert TRT_MISSING_REASON in readme


def test_trt_unet_runs_its_own_engine_call() -> None:
    """TrtUNet must override the stand-in's run (a mis-indented run would leave
    every batch raising NotImplementedError, unseen without TensorRT)."""
    from optimize.trt_backend import TrtUNet
    from optimize.unet_standin import UNetStandIn

    assert issubclass(TrtUNet, UNetStandIn)
    assert TrtUNet.run is not UNetStandIn.run and "run" in vars(TrtUNet)
