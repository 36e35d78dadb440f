"""Host-to-device copies that do not wait for the GPU.

A plain ``torch.tensor(values, device="cuda")`` copies from pageable memory,
which waits for everything queued on the stream first. In the step loop that
wait stops the host from preparing the next UNet call while the GPU runs this
one. These copies go through pinned memory with ``non_blocking``, so they are
queued in stream order like any kernel (PyTorch keeps the pinned buffer alive
until the copy has run).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch


def to_device_async(table: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``table`` (a CPU tensor) on ``device``, queued without a stream sync on CUDA."""
    if device.type == "cuda":
        table = table.pin_memory()
    return table.to(device, non_blocking=True)


def index_on(indices: Sequence[int], device: torch.device) -> torch.Tensor:
    """Row indices as a long tensor on ``device`` (for ``index_select``), without a sync."""
    return to_device_async(torch.tensor(list(indices), dtype=torch.long), device)
