"""What a replacement UNet must look like to the diffusion engine.

The engine calls ``unet(sample, t, encoder_hidden_states=...).sample`` and reads
``unet.config`` (channels, sample size). A stand-in backed by onnxruntime or
TensorRT keeps that surface, so the engine's denoise loop runs unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class UNetResult:
    """Mirrors diffusers' ``UNet2DConditionOutput`` (only ``.sample`` is read)."""

    sample: torch.Tensor


def batch_timesteps(timestep: torch.Tensor | float | int, rows: int, device: torch.device,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """One timestep per row: exported UNets take ``timestep`` with the batch axis.

    The engine passes a scalar (0-d) timestep for the whole batch; diffusers
    broadcasts it, an exported graph needs it spelled out.
    """
    t = torch.as_tensor(timestep, device=device)
    if t.dim() == 0:
        t = t.reshape(1)
    if t.numel() == 1:
        t = t.expand(rows)
    if t.numel() != rows:
        raise ValueError(f"timestep has {t.numel()} values for {rows} rows")
    return t.to(dtype).contiguous()


class UNetStandIn:
    """Base of non-PyTorch UNets: carries the original model's config."""

    def __init__(self, config: Any, device: torch.device) -> None:
        self.config = config
        self.device = device

    def run(self, sample: torch.Tensor, timestep: torch.Tensor,
            encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, sample: torch.Tensor, timestep: torch.Tensor | float | int, *args: Any,
                 encoder_hidden_states: torch.Tensor | None = None, return_dict: bool = True,
                 **kwargs: Any) -> UNetResult | tuple[torch.Tensor]:
        if encoder_hidden_states is None:
            if not args:
                raise TypeError("encoder_hidden_states is required")
            encoder_hidden_states = args[0]
        t = batch_timesteps(timestep, sample.shape[0], sample.device)
        out = self.run(sample, t, encoder_hidden_states)
        return UNetResult(out) if return_dict else (out,)


def swap_unet(engine: Any, standin: UNetStandIn) -> None:
    """Make ``engine``'s denoise loop call ``standin`` instead of its PyTorch UNet.

    LoRAs are merged into PyTorch weights, which a graph or TensorRT engine does
    not have; so the engine's LoRAs are switched off, and a request naming one
    fails with a message instead of silently drawing without it.
    """
    engine.unet = standin
    engine.fast_options = None
    engine.fast = None
    engine.fast_path_enabled = False
    if hasattr(engine, "loras"):
        from imagegenx.engine.lora import EngineLoras

        engine.loras = EngineLoras(None)
