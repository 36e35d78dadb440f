"""Run an exported graph with onnxruntime on the CPU and compare it with PyTorch.

Both sides get the same inputs (``export.example_inputs``: real prompts, real
tokenizer, timesteps across the schedule) at batch sizes other than the one
the graph was exported with, which also proves the batch axis is dynamic.

Tolerance: ``max|onnx - torch| <= atol + rtol * max|torch|`` over the whole
output. Relative to the output's largest magnitude rather than per element,
because elements near zero make element-wise relative errors meaningless.

- fp32 graphs: atol 1e-4, rtol 1e-3. Measured on the tiny model: 1e-6 to 1e-5
  absolute (float summation order differs between the two runtimes).
- fp16 graphs: atol 1e-2, rtol 1e-2 (half precision keeps ~3 decimal digits).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from optimize.export import SPECS, example_inputs, graph_module

if TYPE_CHECKING:
    from imagegenx.engine.diffusion import DiffusionEngine


@dataclass(frozen=True)
class Tolerance:
    atol: float
    rtol: float

    def allows(self, max_abs: float, ref_max: float) -> bool:
        return max_abs <= self.atol + self.rtol * ref_max


TOLERANCES: dict[torch.dtype, Tolerance] = {
    torch.float32: Tolerance(atol=1e-4, rtol=1e-3),
    torch.float16: Tolerance(atol=1e-2, rtol=1e-2),
    torch.bfloat16: Tolerance(atol=5e-2, rtol=5e-2),
}
CHECK_BATCHES: tuple[int, ...] = (1, 3)


@dataclass(frozen=True)
class CheckResult:
    component: str
    batch: int
    max_abs: float
    ref_max: float
    tolerance: Tolerance

    @property
    def max_rel(self) -> float:
        """Largest error relative to the output's largest magnitude."""
        return self.max_abs / max(self.ref_max, 1e-12)

    @property
    def passed(self) -> bool:
        return self.tolerance.allows(self.max_abs, self.ref_max)


def ort_session(path: Path, providers: Sequence[str] = ("CPUExecutionProvider",)) -> object:
    """An onnxruntime session; external data is found next to the graph."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=options, providers=list(providers))


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


def compare(component: str, engine: DiffusionEngine, path: Path,
            batches: Sequence[int] = CHECK_BATCHES, tolerance: Tolerance | None = None) -> list[CheckResult]:
    """onnxruntime (CPU) against the engine's PyTorch module, once per batch size."""
    spec = SPECS[component]
    module = graph_module(component, engine)
    tol = tolerance or TOLERANCES[engine.dtype]
    session = ort_session(path)
    results = []
    for i, batch in enumerate(batches):
        args = example_inputs(component, engine, batch, seed=100 + i)
        with torch.no_grad():
            ref = module(*args).float()
        feeds = {name: _to_numpy(arg) for name, arg in zip(spec.inputs, args, strict=True)}
        out = session.run([spec.output], feeds)[0]
        if out.shape != tuple(ref.shape):
            raise AssertionError(f"{component}: onnxruntime gave shape {out.shape}, PyTorch {tuple(ref.shape)}")
        ref_np = _to_numpy(ref)
        max_abs = float(np.abs(out.astype(np.float32) - ref_np).max())
        results.append(CheckResult(component, batch, max_abs, float(np.abs(ref_np).max()), tol))
    return results
