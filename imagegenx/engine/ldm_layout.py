"""Weight names of the original Stable Diffusion (LDM) single-file checkpoint.

An original checkpoint (e.g. ``v1-5-pruned-emaonly.safetensors``) holds the UNet,
the VAE and the CLIP text encoder in one state dict, under ``model.diffusion_model.``,
``first_stage_model.`` and ``cond_stage_model.transformer.``, with the LDM code's
module names. diffusers converts that layout when it loads such a file; this
module maps the other way, diffusers names to original names. We need it to list
the weights a config expects *before* loading (diffusers leaves missing weights
uninitialised instead of failing) and to write single-file checkpoints of our
random-weight models.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.transformer.text_model."
# Component name -> prefix of its weights in the single file.
PREFIXES: dict[str, str] = {"unet": UNET_PREFIX, "vae": VAE_PREFIX, "text_encoder": TEXT_PREFIX}

StateDict = dict[str, torch.Tensor]

# A UNet resnet's diffusers submodule -> its LDM ResBlock name.
_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_UNET_FIXED = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
# VAE mid-block attention: diffusers linear layers -> LDM 1x1 convolutions.
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def unet_key(key: str, config: Mapping[str, Any]) -> str:
    """The LDM name (without prefix) of diffusers UNet weight ``key``.

    LDM numbers the UNet's layers flat: ``input_blocks`` holds conv_in, then per
    level ``layers_per_block`` (resnet, attention) pairs and a downsampler;
    ``output_blocks`` holds ``layers_per_block + 1`` pairs per level, the last
    one with the upsampler.
    """
    per = config["layers_per_block"] + 1
    module, _, leaf = key.rpartition(".")
    if module in _UNET_FIXED:
        return f"{_UNET_FIXED[module]}.{leaf}"
    if m := re.fullmatch(r"(down|up)_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.(\w+)", key):
        side, block, layer, sub, leaf = m.groups()
        index = int(block) * per + int(layer) + (1 if side == "down" else 0)
        return f"{'input' if side == 'down' else 'output'}_blocks.{index}.0.{_UNET_RESNET[sub]}.{leaf}"
    if m := re.fullmatch(r"(down|up)_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", key):
        side, block, layer, rest = m.groups()
        index = int(block) * per + int(layer) + (1 if side == "down" else 0)
        return f"{'input' if side == 'down' else 'output'}_blocks.{index}.1.{rest}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(\w+)", key):
        return f"input_blocks.{(int(m[1]) + 1) * per}.0.op.{m[2]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(\w+)", key):
        block = int(m[1])
        slot = 2 if "CrossAttn" in config["up_block_types"][block] else 1  # after the attention, if any
        return f"output_blocks.{block * per + per - 1}.{slot}.conv.{m[2]}"
    if m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(\w+)\.(\w+)", key):
        return f"middle_block.{2 * int(m[1])}.{_UNET_RESNET[m[2]]}.{m[3]}"
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key):
        return f"middle_block.1.{m[1]}"
    raise ValueError(f"no original-layout name for UNet weight {key!r}")


def vae_key(key: str, config: Mapping[str, Any]) -> str:
    """The LDM name (without prefix) of diffusers VAE weight ``key``.

    LDM numbers the decoder's levels from the lowest resolution up, diffusers
    from the first block the latents meet; hence the reversed ``up`` index.
    """
    levels = len(config["up_block_types"])
    if m := re.fullmatch(r"(encoder|decoder)\.conv_norm_out\.(\w+)", key):
        return f"{m[1]}.norm_out.{m[2]}"
    if re.fullmatch(r"((encoder|decoder)\.conv_(in|out)|(post_)?quant_conv)\.\w+", key):
        return key
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"encoder.down.{m[1]}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(\w+)", key):
        return f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        level = levels - 1 - int(m[1])
        return f"decoder.up.{level}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(\w+)", key):
        return f"decoder.up.{levels - 1 - int(m[1])}.upsample.conv.{m[2]}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3]}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(\w+)", key):
        if m[2] in _VAE_ATTENTION:
            return f"{m[1]}.mid.attn_1.{_VAE_ATTENTION[m[2]]}.{m[3]}"
    raise ValueError(f"no original-layout name for VAE weight {key!r}")


def text_key(key: str) -> str:
    """The LDM name (without prefix) of a CLIPTextModel weight.

    Recent transformers drop the ``text_model.`` level that SD1.x files keep.
    """
    return key.removeprefix("text_model.")


def to_ldm(
    unet: Mapping[str, torch.Tensor],
    vae: Mapping[str, torch.Tensor],
    text_encoder: Mapping[str, torch.Tensor],
    unet_config: Mapping[str, Any],
    vae_config: Mapping[str, Any],
) -> StateDict:
    """One original-layout state dict from the three diffusers state dicts.

    Works on meta tensors too (only names and shapes are touched), which is how
    the loader learns the names and shapes a config expects.
    """
    out: StateDict = {}
    for key, tensor in unet.items():
        out[UNET_PREFIX + unet_key(key, unet_config)] = tensor
    for key, tensor in vae.items():
        name = vae_key(key, vae_config)
        if ".attn_1." in name and name.endswith("weight") and tensor.ndim == 2:
            tensor = tensor.reshape(*tensor.shape, 1, 1)  # LDM uses 1x1 convolutions there
        out[VAE_PREFIX + name] = tensor
    for key, tensor in text_encoder.items():
        out[TEXT_PREFIX + text_key(key)] = tensor
    return out


def folder_to_single_file(model_dir: Path, out: Path) -> Path:
    """Write the diffusers SD folder ``model_dir`` as one original-layout ``.safetensors`` file.

    Adds the text encoder's ``position_ids`` as SD1.x releases carry it, so the
    file looks like a real one to the loader. Written beside ``out`` and renamed
    into place.
    """
    from safetensors.torch import load_file, save_file

    model_dir, out = Path(model_dir), Path(out)

    def config(name: str) -> dict[str, Any]:
        return json.loads((model_dir / name / "config.json").read_text())

    state = to_ldm(
        load_file(model_dir / "unet" / "diffusion_pytorch_model.safetensors"),
        load_file(model_dir / "vae" / "diffusion_pytorch_model.safetensors"),
        load_file(model_dir / "text_encoder" / "model.safetensors"),
        config("unet"),
        config("vae"),
    )
    positions = config("text_encoder")["max_position_embeddings"]
    state[TEXT_PREFIX + "embeddings.position_ids"] = torch.arange(positions).unsqueeze(0)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.partial")
    save_file({k: v.contiguous() for k, v in state.items()}, str(partial), metadata={"format": "pt"})
    os.replace(partial, out)
    return out
