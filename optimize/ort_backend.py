"""An exported UNet run by onnxruntime, in place of the PyTorch UNet.

Used by ``optimize verify`` to compare the ONNX graph with PyTorch through the
engine's whole denoise loop. Tensors go through host memory (numpy), which is
fine for verification and not meant for serving.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from optimize.export import SPECS
from optimize.unet_standin import UNetStandIn

_NUMPY_OF_ORT = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
                 "tensor(int64)": np.int64, "tensor(int32)": np.int32}


class OrtUNet(UNetStandIn):
    def __init__(self, onnx_path: Path, config: Any, device: torch.device) -> None:
        import onnxruntime as ort

        from optimize.onnx_check import ort_session

        super().__init__(config, torch.device(device))
        providers = ["CPUExecutionProvider"]
        if self.device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        self.session = ort_session(Path(onnx_path), providers)
        self.input_types = {i.name: _NUMPY_OF_ORT.get(i.type, np.float32) for i in self.session.get_inputs()}
        self.output = SPECS["unet"].output

    def run(self, sample: torch.Tensor, timestep: torch.Tensor,
            encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        feeds = {"sample": sample, "timestep": timestep, "encoder_hidden_states": encoder_hidden_states}
        arrays = {name: t.detach().float().cpu().numpy().astype(self.input_types[name])
                  for name, t in feeds.items()}
        out = self.session.run([self.output], arrays)[0]
        return torch.from_numpy(np.ascontiguousarray(out)).to(sample.device, torch.float32)
