"""Host-to-device copies of the step loop: the values and types arrive as given."""
from __future__ import annotations

import torch

from imagegenx.engine.transfer import index_on, to_device_async


def test_index_on_gives_long_indices_on_the_device() -> None:
    idx = index_on([2, 0, 5], torch.device("cpu"))
    assert idx.dtype == torch.long and idx.tolist() == [2, 0, 5]
    rows = torch.arange(12.0).view(6, 2)
    assert rows.index_select(0, idx).tolist() == [[4.0, 5.0], [0.0, 1.0], [10.0, 11.0]]


def test_to_device_async_keeps_the_table() -> None:
    table = torch.tensor([[0.5, 1.5], [2.5, 3.5]])
    moved = to_device_async(table, torch.device("cpu"))
    assert torch.equal(moved, table) and moved.dtype == torch.float32
