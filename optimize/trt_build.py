"""Build a TensorRT engine from an exported ONNX graph (TensorRT 10 / 11 API).

- Strongly typed network: every tensor keeps the type the ONNX graph gives it
  (fp16/bf16 weights and activations, explicit INT8/FP8 Q/DQ from ModelOpt).
  TensorRT 11 has no other way to get reduced precision: implicit INT8
  calibration and the FP16/INT8 builder flags are gone.
- One optimization profile over the batch axis that covers the worker's batch
  buckets (``IMAGEGENX_BATCH_BUCKETS``), doubled for the UNet because the
  engine runs it with classifier-free guidance. Other axes are fixed by the
  export (the model's native size).
- Workspace memory-pool limit, a timing cache file (reused and updated, so a
  rebuild skips kernel timing it has already done), and build progress as
  nested bars through ``trt.IProgressMonitor``.

Nothing here runs without TensorRT; see README "What has been exercised".
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from optimize.trt_common import BatchProfile, PhaseProgress, import_tensorrt, progress_monitor


@dataclass(frozen=True)
class BuildOptions:
    profile: BatchProfile
    workspace_gib: float = 8.0
    timing_cache: Path | None = None
    optimization_level: int | None = None  # TensorRT's builder optimization level 0..5 (None: its default, 3)
    progress: bool = True


@dataclass(frozen=True)
class BuildReport:
    engine: Path
    seconds: float
    engine_bytes: int
    tensorrt_version: str
    input_shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)


class BuildError(RuntimeError):
    """The ONNX graph could not be parsed or the engine not built."""


def profile_shapes(shape: tuple[int, ...], name: str, profile: BatchProfile) -> tuple[tuple[int, ...], ...]:
    """(min, opt, max) shapes of one input whose first axis is the dynamic batch."""
    if not shape or shape[0] != -1:
        raise BuildError(f"input {name!r} has no dynamic batch axis (shape {shape}); export it with "
                         "`imagegenx optimize export`")
    if any(d < 0 for d in shape[1:]):
        raise BuildError(f"input {name!r} has dynamic axes besides the batch (shape {shape}); "
                         "only the batch may vary")
    rest = tuple(shape[1:])
    return ((profile.min_rows, *rest), (profile.opt_rows, *rest), (profile.max_rows, *rest))


def build_engine(onnx_path: Path, engine_path: Path, options: BuildOptions) -> BuildReport:
    """Parse ``onnx_path`` and write a serialized engine to ``engine_path``."""
    trt = import_tensorrt()
    t0 = time.perf_counter()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    # parse_from_file finds external weights (<name>.onnx.data) next to the graph.
    if not parser.parse_from_file(str(onnx_path)):
        errors = "\n".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BuildError(f"TensorRT could not parse {onnx_path}:\n{errors}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(options.workspace_gib * 1024**3))
    if options.optimization_level is not None:
        config.builder_optimization_level = options.optimization_level
    profile = builder.create_optimization_profile()
    shapes: dict[str, Any] = {}
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        shapes[tensor.name] = profile_shapes(tuple(tensor.shape), tensor.name, options.profile)
        profile.set_shape(tensor.name, *shapes[tensor.name])
    config.add_optimization_profile(profile)

    cache_path = options.timing_cache
    cache_bytes = cache_path.read_bytes() if cache_path is not None and cache_path.exists() else b""
    config.set_timing_cache(config.create_timing_cache(cache_bytes), False)
    progress = PhaseProgress() if options.progress else None
    if progress is not None:
        config.progress_monitor = progress_monitor(trt, progress)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BuildError(f"TensorRT failed to build an engine from {onnx_path} (see its log above)")
    engine_path = Path(engine_path)
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    engine_path.write_bytes(memoryview(serialized))
    if cache_path is not None:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        cache_path.write_bytes(memoryview(config.get_timing_cache().serialize()))
    return BuildReport(engine=engine_path, seconds=time.perf_counter() - t0,
                       engine_bytes=engine_path.stat().st_size, tensorrt_version=str(trt.__version__),
                       input_shapes=shapes)
