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
    decode_stream: bool = True,
    batch_buckets: Sequence[int] = (1, 2, 4, 8, 16, 32),
    synthetic_faults: str = "",
    model_config_dir: Path = Path("configs/sd15"),
    lora_dir: Path | None = None,
    unet_backend: str = "torch",
    trt_engine: str | Path = "",
) -> Engine:
    """Build the configured engine. The diffusion engine loads the model folder
    (``ensure_model``: a missing folder gets the tiny model), or loads a single-file
    ``.safetensors`` checkpoint with the component configs in ``model_config_dir``.

    ``compile``, ``cuda_graphs`` and ``batch_buckets`` configure the GPU fast
    path (``imagegenx.engine.fastpath``), and ``decode_stream`` its step-scheduler decodes;
    on the CPU they are ignored. The
    fast path is prepared by the engine's ``warmup()``. ``synthetic_faults``
    configures the synthetic engine's fault injection (a testing aid).
    ``lora_dir`` holds the named LoRAs the diffusion engine merges per batch
    (the synthetic engine draws no model and ignores them).
    ``unet_backend`` "trt" runs the UNet as the TensorRT engine ``trt_engine``
    (``optimize.trt_backend``; then there is no torch fast path and no LoRAs)."""
    if kind == "synthetic":
        from imagegenx.engine.synthetic import SyntheticEngine

        return SyntheticEngine(synthetic_cost, faults=synthetic_faults)
    if kind == "diffusion":
        from imagegenx.engine.diffusion import DiffusionEngine
        from imagegenx.engine.model_init import ensure_model
        from imagegenx.engine.quiet import silence_library_progress
        from imagegenx.engine.single_file import is_single_file, load_single_file_engine

        from imagegenx.engine.fastpath import FastPathOptions

        silence_library_progress()
        device, dtype = resolve_device(device, dtype)
        if unet_backend == "trt":
            from optimize.trt_backend import check_trt_backend

            check_trt_backend(device, trt_engine)  # before loading: a clear error naming the setting
            compile = cuda_graphs = False
        elif unet_backend != "torch":
            raise ValueError(f"unknown unet_backend {unet_backend!r}; expected torch or trt")
        fast = (FastPathOptions(compile=compile, cuda_graphs=cuda_graphs, buckets=tuple(batch_buckets),
                                decode_stream=decode_stream)
                if compile or cuda_graphs else None)
        if is_single_file(Path(model)):
            engine = load_single_file_engine(Path(model), model_config_dir, device=device, dtype=dtype,
                                             fast_path=fast, lora_dir=lora_dir)
        else:
            engine = DiffusionEngine.load(ensure_model(Path(model)), device=device, dtype=dtype, fast_path=fast,
                                          lora_dir=lora_dir)
        if unet_backend == "trt":
            from optimize.trt_backend import attach_trt_unet

            attach_trt_unet(engine, trt_engine)
        return engine
    raise ValueError(f"unknown engine {kind!r}")
