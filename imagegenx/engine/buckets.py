"""Batch-size buckets: how many rows a UNet call of n rows really runs.

Pure arithmetic shared by the GPU fast path (CUDA graphs per bucket) and the
cost models that price a call (the synthetic engine, the step scheduler), so
this module imports no torch.
"""
from __future__ import annotations

from collections.abc import Sequence

__all__ = ["bucket_for", "split_rows"]


def bucket_for(n: int, buckets: Sequence[int]) -> int | None:
    """The smallest bucket holding ``n`` rows, or None when ``n`` exceeds them all."""
    for b in buckets:
        if b >= n:
            return b
    return None


def split_rows(n: int, buckets: Sequence[int]) -> list[tuple[int, int, int]]:
    """(start, rows, bucket) chunks covering ``n`` rows.

    Up to the largest bucket a batch is one chunk padded to its bucket; a larger
    batch is cut into chunks of the largest bucket and a remainder.
    """
    largest = buckets[-1]
    out: list[tuple[int, int, int]] = []
    start = 0
    while start < n:
        rows = min(largest, n - start)
        bucket = bucket_for(rows, buckets)
        assert bucket is not None
        out.append((start, rows, bucket))
        start += rows
    return out
