"""Single-file checkpoints: the tiny model, converted to the original SD layout,
loads through diffusers' single-file support into the very same engine.

Tolerance: none. The conversion only renames tensors (and reshapes the VAE
attention weights to 1x1 convolutions and back), so the loaded modules hold
bit-identical weights and, in fp32 and bf16 on the CPU, every image is
bit-identical to the one the folder-loaded engine draws.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from click.testing import CliRunner  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from imagegenx.cli import main  # noqa: E402
from imagegenx.engine import create_engine  # noqa: E402
from imagegenx.engine.base import BatchSpec, Sample  # noqa: E402
from imagegenx.engine.diffusion import DiffusionEngine  # noqa: E402
from imagegenx.engine.ldm_layout import folder_to_single_file  # noqa: E402
from imagegenx.engine.model_init import (  # noqa: E402
    SD15_UNET,
    SD15_VAE,
    TINY_TEXT_ENCODER,
    _write_model,
    ensure_model,
    write_config_folder,
)
from imagegenx.engine.single_file import ModelLoadError, load_single_file_engine  # noqa: E402
from imagegenx.settings import Settings  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
SAMPLES = (
    Sample("a photo of a cat", seed=42, guidance_scale=7.5),
    Sample("blue sky over mountains", seed=123, guidance_scale=3.0, negative_prompt="blurry"),
)


@pytest.fixture(scope="module")
def config_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_config_folder(tmp_path_factory.mktemp("configs") / "tiny", "tiny")


@pytest.fixture(scope="module")
def checkpoint(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return folder_to_single_file(tiny_model, tmp_path_factory.mktemp("single") / "tiny.safetensors")


def images(engine: DiffusionEngine, sampler: str) -> list[np.ndarray]:
    spec = BatchSpec(width=64, height=64, steps=4, sampler=sampler, samples=SAMPLES)
    return [np.asarray(image) for image in engine.generate(spec)]


def load_error(path: Path, config_dir: Path) -> str:
    with pytest.raises(ModelLoadError) as err:
        load_single_file_engine(path, config_dir)
    message = str(err.value)
    assert "\n" not in message
    return message


def test_file_uses_the_original_layout(tiny_model: Path, checkpoint: Path) -> None:
    with safe_open(str(checkpoint), framework="pt") as f:
        keys = set(f.keys())
        q_weight = f.get_slice("first_stage_model.decoder.mid.attn_1.q.weight").get_shape()
    assert "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight" in keys
    assert "model.diffusion_model.output_blocks.1.0.skip_connection.weight" in keys
    assert "first_stage_model.decoder.up.0.block.0.norm1.weight" in keys
    assert "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight" in keys
    assert "cond_stage_model.transformer.text_model.embeddings.position_ids" in keys
    assert len(q_weight) == 4  # a 1x1 convolution, as in LDM
    prefixes = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer.text_model.")
    assert all(k.startswith(prefixes) for k in keys)
    in_folder = sum(len(load_file(p)) for p in tiny_model.rglob("*.safetensors"))
    assert len(keys) == in_folder + 1  # + position_ids


def test_modules_hold_the_folder_weights(tiny_model: Path, config_dir: Path, checkpoint: Path) -> None:
    single = load_single_file_engine(checkpoint, config_dir)
    loaded = DiffusionEngine.load(tiny_model)
    for name in ("unet", "vae", "text_encoder"):
        a, b = getattr(single, name).state_dict(), getattr(loaded, name).state_dict()
        assert a.keys() == b.keys(), name
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert single.scheduler_config == loaded.scheduler_config
    assert single.tokenizer("a photo of a cat").input_ids == loaded.tokenizer("a photo of a cat").input_ids
    assert single.native_size == loaded.native_size == (64, 64)
    assert single.name == "tiny"


def test_sd15_structure_round_trips(tmp_path: Path) -> None:
    """SD1.5's block structure (4 levels, 2 layers each) at tiny widths: every weight
    lands where diffusers' conversion expects it. The folder doubles as config folder."""
    narrow = {"norm_num_groups": 8, "sample_size": 8}
    folder = _write_model(
        tmp_path / "model",
        unet={**SD15_UNET, **narrow, "block_out_channels": (8, 8, 16, 16), "cross_attention_dim": 32,
              "attention_head_dim": 2},
        vae={**SD15_VAE, **narrow, "block_out_channels": (8, 8, 16, 16)},
        text_encoder=TINY_TEXT_ENCODER,
        seed=3,
        dtype=torch.float32,
    )
    single = load_single_file_engine(folder_to_single_file(folder, tmp_path / "m.safetensors"), folder)
    loaded = DiffusionEngine.load(folder)
    for name in ("unet", "vae", "text_encoder"):
        a, b = getattr(single, name).state_dict(), getattr(loaded, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_same_images_as_the_folder(tiny_model: Path, config_dir: Path, checkpoint: Path, dtype: str) -> None:
    single = create_engine("diffusion", checkpoint, "cpu", dtype, model_config_dir=config_dir)
    assert isinstance(single, DiffusionEngine)
    assert single.unet.dtype == single.vae.dtype == single.text_encoder.dtype == single.dtype
    loaded = DiffusionEngine.load(tiny_model, dtype=dtype)
    for a, b in zip(images(single, "euler_a"), images(loaded, "euler_a"), strict=True):
        assert np.array_equal(a, b), f"max difference {np.abs(a.astype(int) - b).max()}"


def test_missing_file_and_other_suffixes(tmp_path: Path, config_dir: Path) -> None:
    assert "does not exist" in load_error(tmp_path / "absent.safetensors", config_dir)
    pickled = tmp_path / "model.ckpt"
    pickled.write_bytes(b"not loaded")
    assert "not a .safetensors file" in load_error(pickled, config_dir)


def test_truncated_file(tmp_path: Path, checkpoint: Path, config_dir: Path) -> None:
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(checkpoint.read_bytes()[: checkpoint.stat().st_size // 2])
    assert "not a readable safetensors file" in load_error(cut, config_dir)


def test_missing_weights_are_named(tmp_path: Path, checkpoint: Path, config_dir: Path) -> None:
    state = load_file(checkpoint)
    gone = "model.diffusion_model.middle_block.1.proj_out.weight"
    del state[gone], state["first_stage_model.quant_conv.bias"]
    save_file(state, tmp_path / "partial.safetensors")
    message = load_error(tmp_path / "partial.safetensors", config_dir)
    assert "lacks 2 of the" in message and "1 UNet, 1 VAE" in message and gone in message


def test_wrong_shapes_are_named(tmp_path: Path, checkpoint: Path, config_dir: Path) -> None:
    state = load_file(checkpoint)
    key = "cond_stage_model.transformer.text_model.final_layer_norm.weight"
    state[key] = torch.zeros(7)
    save_file(state, tmp_path / "odd.safetensors")
    message = load_error(tmp_path / "odd.safetensors", config_dir)
    assert "do not fit" in message and key in message and "[7]" in message


def test_checkpoint_of_another_architecture(checkpoint: Path) -> None:
    """The tiny file against the shipped SD1.5 configs (the default)."""
    message = load_error(checkpoint, REPO / "configs" / "sd15")
    assert "IMAGEGENX_MODEL_CONFIG_DIR" in message and "lacks" in message


def test_missing_config_dir(checkpoint: Path, tmp_path: Path) -> None:
    assert "IMAGEGENX_MODEL_CONFIG_DIR" in load_error(checkpoint, tmp_path / "no-configs")


def test_ensure_model_checks_but_never_writes_a_single_file(tmp_path: Path, checkpoint: Path) -> None:
    assert ensure_model(checkpoint) == checkpoint
    with pytest.raises(ModelLoadError, match="does not exist"):
        ensure_model(tmp_path / "absent.safetensors")
    assert not list(tmp_path.iterdir())


def test_cli_writes_a_single_file(tmp_path: Path, checkpoint: Path) -> None:
    out = tmp_path / "tiny.safetensors"
    result = CliRunner().invoke(main, ["model", "init", "--tiny", "--single-file", str(out)])
    assert result.exit_code == 0, result.output
    assert out.read_bytes() == checkpoint.read_bytes()  # same seed, same file
    assert [p.name for p in tmp_path.iterdir()] == ["tiny.safetensors"]  # no staging left over
    again = CliRunner().invoke(main, ["model", "init", "--single-file", str(out)])
    assert again.exit_code != 0 and "already holds a model" in again.output
    wrong = CliRunner().invoke(main, ["model", "init", "--single-file", str(tmp_path / "x.ckpt")])
    assert wrong.exit_code != 0 and ".safetensors" in wrong.output


def test_served_name_of_a_single_file(clean_env: None) -> None:
    assert Settings(model=Path("/m/v1-5-pruned-emaonly.safetensors")).served_model_name == "v1-5-pruned-emaonly"
    assert Settings(model=Path("var/models/tiny")).served_model_name == "tiny"
