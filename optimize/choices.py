"""Names the ``imagegenx optimize`` commands accept, importable without torch."""
from __future__ import annotations

COMPONENTS: tuple[str, ...] = ("unet", "vae_decoder", "text_encoder")
EXPORTERS: tuple[str, ...] = ("auto", "dynamo", "torchscript")
RECIPES: tuple[str, ...] = ("int8", "fp8")
# shapes: prompts of the shipped shapes model (the default model); general: SD1.5-style prompts.
PROMPT_SETS: tuple[str, ...] = ("shapes", "general")
BACKENDS: tuple[str, ...] = (
    "torch-fp32", "torch-fp16", "torch-bf16", "onnx", "int8-fakequant", "fp8-fakequant", "trt",
)
