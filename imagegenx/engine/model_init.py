"""Write Stable Diffusion 1.5-layout model folders with random weights.

No weights can be downloaded where the tests run, so a *tiny* model with exactly
SD1.5's component classes and folder layout (random weights) is written for
them: the whole engine path (tokenizer, text encoder, UNet, scheduler, VAE)
runs for real on a laptop CPU in well under a second per image. The default
model that draws real pictures is the shipped, trained shapes model
(``imagegenx.shapes``). ``write_sd15_model`` writes the
full-size architecture (random weights) for load and throughput tests on GPUs.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import diffusers
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from imagegenx.engine.ldm_layout import folder_to_single_file
from imagegenx.engine.single_file import ModelLoadError, check_single_file, is_single_file
from imagegenx.engine.tokenizer import (
    BOS_TOKEN,
    EOS_TOKEN,
    MAX_LENGTH,
    VOCAB_SIZE,
    clip_vocab_and_merges,
    write_clip_tokenizer,
)
from imagegenx.shapes.model_files import SHAPES_MODEL, SHAPES_MODEL_SETTING, packaged

# SD1.5's noise schedule (its published scheduler/scheduler_config.json).
SD15_SCHEDULER: dict[str, Any] = {
    "_class_name": "PNDMScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "steps_offset": 1,
    "skip_prk_steps": True,
    "set_alpha_to_one": False,
    "clip_sample": False,
    "trained_betas": None,
}

SD15_UNET: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
}

SD15_VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}

# CLIP ViT-L/14's text tower, as SD1.5's text_encoder/config.json describes it.
SD15_TEXT_ENCODER: dict[str, Any] = {
    "vocab_size": VOCAB_SIZE,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": MAX_LENGTH,
    "projection_dim": 768,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "attention_dropout": 0.0,
    "dropout": 0.0,
    "initializer_range": 0.02,
    "initializer_factor": 1.0,
}

# Tiny sizes: 64x64 native images (8x8x4 latents) and a few thousand channels
# in total. Same block types as SD1.5 (cross-attention at the high-resolution
# level, none at the bottom) so every code path of the real model is used.
TINY_UNET: dict[str, Any] = {
    **SD15_UNET,
    "sample_size": 8,
    "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
    "block_out_channels": (32, 64),
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "cross_attention_dim": 32,
    "attention_head_dim": 2,
}

TINY_VAE: dict[str, Any] = {
    **SD15_VAE,
    "block_out_channels": (16, 16, 32, 32),  # 4 levels: scale factor 8
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "sample_size": 64,
}

TINY_TEXT_ENCODER: dict[str, Any] = {
    **SD15_TEXT_ENCODER,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "projection_dim": 32,
}


def _model_index() -> dict[str, Any]:
    """``model_index.json`` of a StableDiffusionPipeline without safety checker."""
    return {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "PNDMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }


# Architecture name -> (UNet, VAE, text encoder) specs.
ARCHS: dict[str, tuple[dict[str, Any], dict[str, Any], dict[str, Any]]] = {
    "tiny": (TINY_UNET, TINY_VAE, TINY_TEXT_ENCODER),
    "sd15": (SD15_UNET, SD15_VAE, SD15_TEXT_ENCODER),
}


def component_configs(arch: str = "sd15") -> dict[str, dict[str, Any]]:
    """The weightless diffusers config files of ``arch``: relative path -> JSON.

    A single-file checkpoint carries weights only; diffusers builds the modules
    from these. Keys not given take the classes' defaults, exactly as in the
    folders written by ``save_pretrained``. No library versions are written, so
    the shipped files stay valid across upgrades.
    """
    unet, vae, text = ARCHS[arch]
    vocab, _ = clip_vocab_and_merges()
    index = {k: v for k, v in _model_index().items() if k != "_diffusers_version"}
    return {
        "model_index.json": index,
        "unet/config.json": {"_class_name": "UNet2DConditionModel", **unet},
        "vae/config.json": {"_class_name": "AutoencoderKL", **vae},
        "text_encoder/config.json": {
            "architectures": ["CLIPTextModel"],
            "model_type": "clip_text_model",
            **text,
            "bos_token_id": vocab[BOS_TOKEN],
            "eos_token_id": vocab[EOS_TOKEN],
            "pad_token_id": vocab[EOS_TOKEN],
        },
        "scheduler/scheduler_config.json": SD15_SCHEDULER,
    }


def write_config_folder(path: Path, arch: str = "sd15") -> Path:
    """Write the config files of ``arch`` (no weights) under ``path``.

    ``configs/sd15`` in the repository is this function's output for "sd15".
    """
    path = Path(path)
    for rel, data in component_configs(arch).items():
        _write_json(path / rel, data)
    return path


def _text_config(spec: dict[str, Any]) -> CLIPTextConfig:
    vocab, _ = clip_vocab_and_merges()
    return CLIPTextConfig(
        **spec,
        bos_token_id=vocab[BOS_TOKEN],
        eos_token_id=vocab[EOS_TOKEN],
        pad_token_id=vocab[EOS_TOKEN],
    )


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _write_model(
    path: Path,
    *,
    unet: dict[str, Any],
    vae: dict[str, Any],
    text_encoder: dict[str, Any],
    seed: int,
    dtype: torch.dtype,
) -> Path:
    """Build each component from a seeded RNG, save it, free it, move on.

    Components are written one at a time so the full-size model never holds
    more than one network in memory. The global RNG is left untouched.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    builders = (
        ("unet", lambda: UNet2DConditionModel(**unet)),
        ("vae", lambda: AutoencoderKL(**vae)),
        ("text_encoder", lambda: CLIPTextModel(_text_config(text_encoder))),
    )
    for offset, (name, build) in enumerate(builders):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + offset)
            module = build()
        if dtype != torch.float32:
            # nn.Module.to: the weights are random, no fp32-pinned modules to keep.
            module = torch.nn.Module.to(module, dtype)
        module.save_pretrained(path / name, safe_serialization=True)
        del module
    write_clip_tokenizer(path / "tokenizer")
    _write_json(path / "scheduler" / "scheduler_config.json", SD15_SCHEDULER)
    _write_json(path / "model_index.json", _model_index())
    return path


def write_tiny_model(path: Path, seed: int = 0) -> Path:
    """Write the tiny SD1.5-layout model (fp32, 64x64 native) to ``path``.

    The same seed always produces the same weight files.
    """
    return _write_model(
        path, unet=TINY_UNET, vae=TINY_VAE, text_encoder=TINY_TEXT_ENCODER, seed=seed, dtype=torch.float32
    )


def write_sd15_model(path: Path, seed: int = 0, dtype: torch.dtype = torch.float16) -> Path:
    """Write the full SD1.5 architecture (859.5M-parameter UNet) with random weights.

    Useful to measure memory and speed of the real model size without its
    weights; the images are meaningless. Needs ~2.1 GB on disk in fp16.
    """
    return _write_model(
        path, unet=SD15_UNET, vae=SD15_VAE, text_encoder=SD15_TEXT_ENCODER, seed=seed, dtype=dtype
    )


def write_single_file_model(path: Path, arch: str = "tiny", seed: int = 0) -> Path:
    """Write a random-weight model of ``arch`` as one original-layout ``.safetensors`` file.

    For testing the single-file loader, and its speed with the full SD1.5
    size (fp16, ~2.1 GB). The diffusers folder is written first, beside
    ``path``, then converted and removed.
    """
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise ValueError(f"{path}: a single-file model must end in .safetensors")
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{path.name}-", dir=path.parent) as staging:
        folder = Path(staging) / "model"
        if arch == "sd15":
            write_sd15_model(folder, seed=seed)
        else:
            write_tiny_model(folder, seed=seed)
        return folder_to_single_file(folder, path)


def ensure_model(path: Path, seed: int = 0) -> Path:
    """Return ``path`` (``packaged``), first writing the tiny model there if it holds no model.

    The model is written into a sibling temporary folder and renamed into
    place, so concurrent workers never load a half-written folder. A
    single-file checkpoint is never written, only checked (it must exist),
    and neither is the shipped shapes model: a stand-in there would hide a
    broken installation.
    """
    asked, path = Path(path), packaged(Path(path))
    if is_single_file(path):
        return check_single_file(path)
    if (path / "model_index.json").is_file():
        return path
    shipped = path.resolve() == SHAPES_MODEL.resolve()
    if shipped or asked == SHAPES_MODEL_SETTING:
        if path.exists() and not shipped:
            raise ModelLoadError(f"{path} in the working directory holds no model and hides the shipped shapes "
                                 "model: remove it, or set IMAGEGENX_MODEL to another model")
        raise ModelLoadError(f"the shipped shapes model is missing from this installation ({path}): "
                             "reinstall imagegenx, or set IMAGEGENX_MODEL to another model")
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    try:
        write_tiny_model(staging, seed=seed)
        if path.is_dir() and not any(path.iterdir()):
            path.rmdir()
        try:
            os.rename(staging, path)
        except OSError:
            if not (path / "model_index.json").is_file():  # not a lost race
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path
