"""Image engines. Only the backends import torch; this package root does not."""
from __future__ import annotations

from pathlib import Path

from imagegenx.engine.base import BatchSpec, Engine, Sample, StepCallback

__all__ = ["BatchSpec", "Engine", "Sample", "StepCallback", "create_engine"]


def resolve_device(device: str, dtype: str) -> tuple[str, str]:
    """'auto' means the GPU in half precision when there is one, else CPU fp32."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        dtype = "fp16" if device == "cuda" else "fp32"
    return device, dtype


def create_engine(
    kind: str,
    model: Path,
    device: str = "auto",
    dtype: str = "auto",
    synthetic_cost: str = "zero",
) -> Engine:
    """Build the configured engine. The diffusion engine loads (and, for the
    embedded default, first writes) the model folder."""
    if kind == "synthetic":
        from imagegenx.engine.synthetic import SyntheticEngine

        return SyntheticEngine(synthetic_cost)
    if kind == "diffusion":
        from imagegenx.engine.diffusion import DiffusionEngine
        from imagegenx.engine.model_init import ensure_model
        from imagegenx.engine.quiet import silence_library_progress

        silence_library_progress()
        device, dtype = resolve_device(device, dtype)
        return DiffusionEngine.load(ensure_model(Path(model)), device=device, dtype=dtype)
    raise ValueError(f"unknown engine {kind!r}")
