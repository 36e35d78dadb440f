"""The ``trt`` UNet backend: a TensorRT engine in place of the PyTorch UNet.

The engine runs on buffers torch owns and on torch's current CUDA stream, so it
orders correctly with the rest of the denoise loop and needs no pycuda:
``set_input_shape`` and ``set_tensor_address`` with the tensors' ``data_ptr()``,
an output tensor allocated by torch at the shape TensorRT reports, then
``execute_async_v3(torch.cuda.current_stream().cuda_stream)``.

A batch outside the engine's optimization profile fails with a message saying
which rows were asked for and which the profile covers (``BatchOutsideProfile``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from optimize.trt_common import BatchProfile, TensorRTUnavailable, import_tensorrt, torch_dtype
from optimize.unet_standin import UNetStandIn, swap_unet

UNET_INPUTS = ("sample", "timestep", "encoder_hidden_states")


class TrtBackendError(RuntimeError):
    """The ``trt`` backend cannot start; the message names the setting to change."""


def check_trt_backend(device: str | torch.device, engine_path: str | Path) -> Path:
    """Fail early, naming the setting, when the trt backend cannot run here."""
    try:
        import_tensorrt()
    except TensorRTUnavailable as exc:
        raise TrtBackendError(f"unet_backend is 'trt' (IMAGEGENX_UNET_BACKEND) but {exc}; "
                              "or set IMAGEGENX_UNET_BACKEND=torch") from None
    if not str(engine_path):
        raise TrtBackendError("unet_backend 'trt' needs trt_engine (IMAGEGENX_TRT_ENGINE): "
                              "an engine file written by `imagegenx optimize build`")
    path = Path(engine_path)
    if not path.is_file():
        raise TrtBackendError(f"trt_engine (IMAGEGENX_TRT_ENGINE) {path} is not a file")
    if torch.device(device).type != "cuda":
        raise TrtBackendError(f"unet_backend 'trt' (IMAGEGENX_UNET_BACKEND) runs on CUDA only; "
                              f"the device is {device} (IMAGEGENX_DEVICE)")
    return path


class TrtUNet(UNetStandIn):
    """Callable like diffusers' UNet2DConditionModel, backed by a TensorRT engine."""

    def __init__(self, engine_path: Path, config: Any, device: torch.device) -> None:
        super().__init__(config, torch.device(device))
        trt = import_tensorrt()
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        engine = self._runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
        if engine is None:
            raise TrtBackendError(f"TensorRT could not load {engine_path} (IMAGEGENX_TRT_ENGINE): engines only "
                                  "load with the TensorRT version and GPU model that built them")
        self.engine = engine
        self.context = engine.create_execution_context()
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if n not in inputs]
        if sorted(inputs) != sorted(UNET_INPUTS) or len(outputs) != 1:
            raise TrtBackendError(f"{engine_path} is not a UNet engine: inputs {inputs}, outputs {outputs}")
        self.output = outputs[0]
        self.dtypes = {n: torch_dtype(engine.get_tensor_dtype(n)) for n in names}
        lo, opt, hi = (tuple(s) for s in engine.get_tensor_profile_shape("sample", 0))
        self.profile = BatchProfile(lo[0], opt[0], hi[0])
        self.sample_shape = tuple(hi[1:])

    def run(self, sample: torch.Tensor, timestep: torch.Tensor,
            encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        rows = sample.shape[0]
        self.profile.check(rows)
        if tuple(sample.shape[1:]) != self.sample_shape:
            raise ValueError(f"the TensorRT engine was built for latents {self.sample_shape}, got "
                             f"{tuple(sample.shape[1:])}: only the model's native size is supported")
        feeds = {"sample": sample, "timestep": timestep, "encoder_hidden_states": encoder_hidden_states}
        kept = []  # inputs stay referenced until the launch is queued
        for name, tensor in feeds.items():
            t = tensor.to(self.device, self.dtypes[name]).contiguous()
            kept.append(t)
            if not self.context.set_input_shape(name, tuple(t.shape)):
                raise ValueError(f"TensorRT refused shape {tuple(t.shape)} for input {name!r}")
            self.context.set_tensor_address(name, t.data_ptr())
        out = torch.empty(tuple(self.context.get_tensor_shape(self.output)), dtype=self.dtypes[self.output],
                          device=self.device)
        self.context.set_tensor_address(self.output, out.data_ptr())
        stream = torch.cuda.current_stream(self.device)
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 failed")
        return out

    @classmethod
    def load(cls, engine_path: str | Path, *, config: Any, device: str | torch.device) -> TrtUNet:
        path = check_trt_backend(device, engine_path)
        return cls(path, config, torch.device(device))


def attach_trt_unet(engine: Any, engine_path: str | Path) -> None:
    """Serve ``engine``'s UNet from the TensorRT engine at ``engine_path``."""
    swap_unet(engine, TrtUNet.load(engine_path, config=engine.unet.config, device=engine.device))
