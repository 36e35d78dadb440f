"""Names the ``imagegenx optimize`` commands accept, importable without torch."""
from __future__ import annotations

from pathlib import Path

COMPONENTS: tuple[str, ...] = ("unet", "vae_decoder", "text_encoder")
EXPORTERS: tuple[str, ...] = ("auto", "dynamo", "torchscript")
RECIPES: tuple[str, ...] = ("int8", "fp8")
# The shipped calibration prompts of each prompt set: shapes, of the shipped shapes model (the
# default model); general, SD1.5-style prompts.
PROMPT_FILES: dict[str, Path] = {
    "shapes": Path(__file__).with_name("calibration_prompts_shapes.txt"),
    "general": Path(__file__).with_name("calibration_prompts.txt"),
}
PROMPT_SETS: tuple[str, ...] = tuple(PROMPT_FILES)
BACKENDS: tuple[str, ...] = (
    "torch-fp32", "torch-fp16", "torch-bf16", "onnx", "int8-fakequant", "fp8-fakequant", "trt",
)
