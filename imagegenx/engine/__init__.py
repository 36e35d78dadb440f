"""Image engines. Only the backends import torch; this package root does not."""
from __future__ import annotations

from collections.abc import Sequence
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
    *,
    compile: bool = False,
    cuda_graphs: bool = False,
    batch_buckets: Sequence[int] = (1, 2, 4, 8, 16, 32),
    synthetic_faults: str = "",
) -> Engine:
    """Build the configured engine. The diffusion engine loads (and, for the
    embedded default, first writes) the model folder.

    ``compile``, ``cuda_graphs`` and ``batch_buckets`` configure the GPU fast
    path (``imagegenx.engine.fastpath``); on the CPU they are ignored. The
    fast path is prepared by the engine's ``warmup()``. ``synthetic_faults``
    configures the synthetic engine's fault injection (a testing aid)."""
    if kind == "synthetic":
        from imagegenx.engine.synthetic import SyntheticEngine

        return SyntheticEngine(synthetic_cost, faults=synthetic_faults)
    if kind == "diffusion":
        from imagegenx.engine.diffusion import DiffusionEngine
        from imagegenx.engine.model_init import ensure_model
        from imagegenx.engine.quiet import silence_library_progress

        from imagegenx.engine.fastpath import FastPathOptions

        silence_library_progress()
        device, dtype = resolve_device(device, dtype)
        fast = (FastPathOptions(compile=compile, cuda_graphs=cuda_graphs, buckets=tuple(batch_buckets))
                if compile or cuda_graphs else None)
        return DiffusionEngine.load(ensure_model(Path(model)), device=device, dtype=dtype, fast_path=fast)
    raise ValueError(f"unknown engine {kind!r}")
