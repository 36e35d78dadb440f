"""Architecture of the shapes model: SD1.5's component classes, scaled down.

64x64 pictures, a VAE with scale factor 4 (16x16x4 latents), a two-level UNet
(16x16 and 8x8, cross-attention at 8x8 and in the middle block) and a 4-layer
CLIP text encoder over the real CLIP BPE vocabulary: about 8 M parameters,
~17 MB in fp16. The UNet is sized for the CPU: a 20-step image must take at
most 1 s on two cores, and at these sizes the cost is the number of layers, not
their width (on the 2-core machine one CFG step took 72 ms with the earlier
three-level UNet, channels 64/128/128, and 42.5 ms with this one).
"""
from __future__ import annotations

from typing import Any

from imagegenx.engine.model_init import SD15_TEXT_ENCODER, SD15_UNET, SD15_VAE

IMAGE_SIZE = 64

UNET: dict[str, Any] = {
    **SD15_UNET,
    "sample_size": 16,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (64, 128),
    "layers_per_block": 1,
    "norm_num_groups": 32,
    "cross_attention_dim": 64,
    "attention_head_dim": 8,
}

VAE: dict[str, Any] = {
    **SD15_VAE,
    "down_block_types": ("DownEncoderBlock2D",) * 3,
    "up_block_types": ("UpDecoderBlock2D",) * 3,
    "block_out_channels": (32, 64, 64),
    "layers_per_block": 1,
    "norm_num_groups": 16,
    "sample_size": IMAGE_SIZE,
}

TEXT_ENCODER: dict[str, Any] = {
    **SD15_TEXT_ENCODER,
    "hidden_size": 64,
    "intermediate_size": 256,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "projection_dim": 64,
}
