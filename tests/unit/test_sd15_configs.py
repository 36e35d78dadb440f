"""The shipped SD1.5 config folder is what the code writes, and describes SD1.5."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from imagegenx.engine.model_init import write_config_folder  # noqa: E402
from imagegenx.engine.single_file import (  # noqa: E402
    DEFAULT_CONFIG_DIR,
    ModelLoadError,
    expected_shapes,
    resolve_config_dir,
)

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "configs" / "sd15"


def files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_shipped_configs_are_what_the_code_writes(tmp_path: Path) -> None:
    """Regenerate with ``write_config_folder("configs/sd15")`` after changing the SD15_* dicts."""
    assert files(SHIPPED) == files(write_config_folder(tmp_path / "sd15", "sd15"))


def test_configs_name_the_original_sd15_weights() -> None:
    """Names and shapes as in v1-5-pruned-emaonly.safetensors: 686 UNet, 248 VAE, 196 CLIP weights."""
    shapes = expected_shapes(SHIPPED)
    counts = {prefix: sum(k.startswith(prefix) for k in shapes)
              for prefix in ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer.")}
    assert list(counts.values()) == [686, 248, 196]
    unet = "model.diffusion_model."
    assert shapes[unet + "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"] == (320, 320)
    assert shapes[unet + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"] == (320, 768)
    assert shapes[unet + "input_blocks.9.0.op.weight"] == (1280, 1280, 3, 3)
    assert shapes[unet + "middle_block.1.proj_in.weight"] == (1280, 1280, 1, 1)
    assert shapes[unet + "output_blocks.2.1.conv.weight"] == (1280, 1280, 3, 3)  # no attention at the bottom
    assert shapes[unet + "output_blocks.5.2.conv.weight"] == (1280, 1280, 3, 3)
    assert shapes[unet + "output_blocks.11.0.skip_connection.weight"] == (320, 640, 1, 1)
    assert shapes[unet + "time_embed.0.weight"] == (1280, 320)
    assert shapes["first_stage_model.decoder.up.3.upsample.conv.weight"] == (512, 512, 3, 3)
    assert shapes["first_stage_model.decoder.up.0.block.0.nin_shortcut.weight"] == (128, 256, 1, 1)
    assert shapes["first_stage_model.encoder.mid.attn_1.q.weight"] == (512, 512, 1, 1)
    assert shapes["first_stage_model.post_quant_conv.weight"] == (4, 4, 1, 1)
    assert shapes["cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"] == (49408, 768)
    assert shapes["cond_stage_model.transformer.text_model.final_layer_norm.weight"] == (768,)


def test_default_config_dir_resolves_from_any_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert resolve_config_dir(DEFAULT_CONFIG_DIR) == REPO / "configs" / "sd15"


def test_missing_config_dir_names_the_setting(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="IMAGEGENX_MODEL_CONFIG_DIR") as err:
        resolve_config_dir(tmp_path / "nowhere")
    assert "\n" not in str(err.value)
