"""Engines that differ only in how the UNet runs, for side-by-side verification.

Each backend is the same ``DiffusionEngine`` (same tokenizer, text encoder,
scheduler, VAE, seeds) with one UNet swapped:

- ``torch-fp32`` / ``torch-fp16`` / ``torch-bf16``: the PyTorch UNet (half
  precisions on a CUDA GPU only);
- ``onnx``: the exported fp32 graph run by onnxruntime;
- ``int8-fakequant`` / ``fp8-fakequant``: the PyTorch UNet with ModelOpt fake
  quantization, restored from ``optimize quantize`` output or calibrated on the
  spot from a short capture;
- ``trt``: a TensorRT engine (``optimize build``).
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from imagegenx.engine.diffusion import DiffusionEngine
from optimize.choices import BACKENDS
from optimize.unet_standin import swap_unet



class BackendError(ValueError):
    """A backend cannot be built with the given options; the message names the option."""


@dataclass
class BackendOptions:
    model: Path
    device: str = "cpu"  # already resolved: cpu or cuda
    onnx_unet: Path | None = None
    quant_states: dict[str, Path] = field(default_factory=dict)  # recipe -> `optimize quantize` output
    calibration: Path | None = None
    calib_prompts: int = 8
    calib_prompt_file: Path | None = None  # default: the shipped general calibration prompts
    calib_steps: int = 8
    trt_engine: Path | None = None
    exporter: str = "auto"
    workdir: Path | None = None  # where backend onnx exports the UNet (default: a new temporary folder)


def _fake_quant_dtype(device: str) -> str:
    """Fake quantization runs where the reference does: fp16 on CUDA, fp32 on the CPU."""
    return "fp16" if device == "cuda" else "fp32"


def load_engine(model: Path, device: str, dtype: str) -> DiffusionEngine:
    """The engine the worker would build (folder or single-file checkpoint), without fast path."""
    from imagegenx.engine import create_engine

    return create_engine("diffusion", model, device, dtype)  # type: ignore[return-value]


def _load(opts: BackendOptions, dtype: str) -> DiffusionEngine:
    return load_engine(opts.model, opts.device, dtype)


def _onnx_engine(opts: BackendOptions) -> DiffusionEngine:
    from optimize.export import export_components
    from optimize.ort_backend import OrtUNet

    engine = _load(opts, "fp32")
    path = opts.onnx_unet
    if path is None:
        workdir = opts.workdir or Path(tempfile.mkdtemp(prefix="imagegenx-verify-"))
        path = export_components(engine, workdir, ["unet"], exporter=opts.exporter)[0].path
    elif not Path(path).is_file():
        raise BackendError(f"--onnx-unet {path} is not a file")
    swap_unet(engine, OrtUNet(Path(path), engine.unet.config, engine.device))
    return engine


def _fake_quant_engine(opts: BackendOptions, recipe: str) -> DiffusionEngine:
    from optimize.calibration import CalibrationSet, capture, load_prompts
    from optimize.quantize import fp8_fake_quant_available, quantize_unet, restore_state

    if recipe == "fp8":
        ok, reason = fp8_fake_quant_available(opts.device)
        if not ok:
            raise BackendError(f"fp8-fakequant: {reason}")
    engine = _load(opts, _fake_quant_dtype(opts.device))
    state = opts.quant_states.get(recipe)
    if state is not None:
        if not Path(state).is_file():
            raise BackendError(f"--{recipe}-state {state} is not a file")
        restore_state(engine.unet, state)
        return engine
    if opts.calibration is not None:
        calib = CalibrationSet.load(opts.calibration)
    else:
        prompts = load_prompts(opts.calib_prompt_file)[: opts.calib_prompts]
        calib = capture(engine, prompts, steps=opts.calib_steps, every=1, batch_size=4)
    quantize_unet(engine.unet, calib, recipe)
    return engine


def _trt_engine(opts: BackendOptions) -> DiffusionEngine:
    from optimize.trt_backend import TrtUNet
    from optimize.trt_common import TensorRTUnavailable, import_tensorrt

    try:
        import_tensorrt()
    except TensorRTUnavailable as exc:
        raise BackendError(f"trt: {exc}") from None
    if opts.trt_engine is None or not Path(opts.trt_engine).is_file():
        raise BackendError(f"backend trt needs --trt-engine (an engine file from `imagegenx optimize build`), "
                           f"got {opts.trt_engine}")
    if opts.device != "cuda":
        raise BackendError("backend trt runs on CUDA only (--device cuda)")
    engine = _load(opts, "fp16")
    swap_unet(engine, TrtUNet.load(opts.trt_engine, config=engine.unet.config, device=engine.device))
    return engine


def make_engine(backend: str, opts: BackendOptions) -> DiffusionEngine:
    """A fresh engine for ``backend``; raises BackendError saying what is missing."""
    if backend not in BACKENDS:
        raise BackendError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    if backend.startswith("torch-"):
        dtype = backend.removeprefix("torch-")
        if dtype != "fp32" and opts.device != "cuda":
            raise BackendError(f"{backend} needs a CUDA GPU (--device cuda)")
        return _load(opts, dtype)
    if backend == "onnx":
        return _onnx_engine(opts)
    if backend.endswith("-fakequant"):
        return _fake_quant_engine(opts, backend.removesuffix("-fakequant"))
    return _trt_engine(opts)


def release(engine: DiffusionEngine) -> None:
    """Drop an engine's memory before the next backend loads."""
    engine.release_memory()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
