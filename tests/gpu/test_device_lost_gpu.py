"""A sticky CUDA error on a real GPU: a device-side assert is a device error,
the engine's probe (``DiffusionEngine.device_usable``) fails after it, so the
worker treats the device as lost (``pipeline.lost_device``); before it, the probe
passes. In a child process, since the error poisons the CUDA context for good.
Needs a CUDA GPU (skipped without one)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

REPO = Path(__file__).resolve().parents[2]

CHILD = """
import types
import torch
from imagegenx.engine.diffusion import DiffusionEngine
from imagegenx.errors import is_device_error
from imagegenx.pipeline import lost_device

engine = types.SimpleNamespace(device=torch.device("cuda"))
engine.device_usable = lambda: DiffusionEngine.device_usable(engine)
print("usable before:", engine.device_usable())
x = torch.zeros(4, device="cuda")
try:
    x[torch.tensor([10], device="cuda")] = 1.0  # out of bounds: a device-side assert
    torch.cuda.synchronize()
    print("no error")
except Exception as exc:
    print("error:", type(exc).__name__, str(exc).splitlines()[0])
    print("device error:", is_device_error(exc))
    print("usable after:", engine.device_usable())
    print("lost:", lost_device(engine, exc) is not None)
"""


def test_a_device_side_assert_loses_the_device_and_the_probe_tells() -> None:
    done = subprocess.run([sys.executable, "-c", CHILD], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    out = done.stdout
    assert "usable before: True" in out, (out, done.stderr[-2000:])
    assert "error: AcceleratorError" in out or "error: RuntimeError" in out, out
    assert "device error: True" in out, out
    assert "usable after: False" in out, out
    assert "lost: True" in out, out
