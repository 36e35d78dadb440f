"""Tiny LoRA files for the tiny model, written the way training scripts write them.

peft injects LoRA layers (to_q/to_k/to_v/to_out.0 in the UNet, q/k/v/out_proj
in the text encoder), lora_B is set to seeded random values (peft starts it at
zero, which would change nothing), and diffusers' ``save_lora_weights`` writes
the file with the adapter configs as metadata. ``write_kohya`` writes the same
weights in the kohya/A1111 layout with diffusers' converter.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_kohya
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
from safetensors.torch import save_file
from transformers import CLIPTextModel

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def _randomise_b(module: torch.nn.Module, seed: int, std: float) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(module.named_parameters()):
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * std)


def _lora_state(module: torch.nn.Module, config: LoraConfig, seed: int, std: float) -> dict[str, torch.Tensor]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        inject_adapter_in_model(config, module)
    _randomise_b(module, seed + 1, std)
    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(module).items()}


def write_lora(model_dir: Path, folder: Path, *, seed: int, unet_rank: int = 4, unet_alpha: float = 8.0,
               text_rank: int | None = 2, text_alpha: float = 2.0, std: float = 0.3) -> Path:
    """A diffusers-format LoRA (UNet and, unless text_rank is None, text encoder) in ``folder``."""
    unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet", local_files_only=True)
    unet_cfg = LoraConfig(r=unet_rank, lora_alpha=unet_alpha, target_modules=UNET_TARGETS)
    layers: dict[str, object] = {
        "unet_lora_layers": convert_state_dict_to_diffusers(_lora_state(unet, unet_cfg, seed, std)),
        "unet_lora_adapter_metadata": _metadata(unet_cfg),
    }
    if text_rank is not None:
        text = CLIPTextModel.from_pretrained(model_dir, subfolder="text_encoder", local_files_only=True)
        text_cfg = LoraConfig(r=text_rank, lora_alpha=text_alpha, target_modules=TEXT_TARGETS)
        layers["text_encoder_lora_layers"] = convert_state_dict_to_diffusers(
            _lora_state(text, text_cfg, seed + 10, std))
        layers["text_encoder_lora_adapter_metadata"] = _metadata(text_cfg)
    StableDiffusionPipeline.save_lora_weights(folder, **layers)  # type: ignore[arg-type]
    return folder / "pytorch_lora_weights.safetensors"


def _metadata(config: LoraConfig) -> dict[str, object]:
    return json.loads(json.dumps(config.to_dict(), default=sorted))  # sets (target_modules) as lists


def write_kohya(diffusers_file: Path, folder: Path, unet_alpha: float, text_alpha: float) -> Path:
    """The same LoRA in the kohya/A1111 layout (lora_unet_*/lora_te_* keys, per-module alpha)."""
    state, _ = StableDiffusionPipeline.lora_state_dict(str(diffusers_file.parent), weight_name=diffusers_file.name,
                                                       local_files_only=True)
    from diffusers.utils import convert_state_dict_to_peft, convert_unet_state_dict_to_peft

    unet = convert_unet_state_dict_to_peft({k: v for k, v in state.items() if k.startswith("unet.")})
    text = convert_state_dict_to_peft({k.replace("text_encoder.", "text_encoder.text_model.", 1): v
                                       for k, v in state.items() if k.startswith("text_encoder.")})
    kohya = convert_state_dict_to_kohya({**unet, **text})
    for key in kohya:
        if key.endswith(".alpha"):
            kohya[key] = torch.tensor(unet_alpha if key.startswith("lora_unet_") else text_alpha)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "style.safetensors"
    save_file({k: v.contiguous() for k, v in kohya.items()}, path)
    return path
