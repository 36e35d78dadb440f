"""The batching policy under a fake clock: the classic batching bugs."""
from __future__ import annotations

import pytest

from imagegenx.batching import BatchKey, BatchPolicy, prefetch_window

A = BatchKey("m", 512, 512, 20, "euler")
B = BatchKey("m", 768, 512, 20, "euler")


def make(max_batch: int = 4, max_wait: float = 0.05) -> BatchPolicy[str]:
    return BatchPolicy(max_batch=max_batch, max_wait=max_wait)


def test_nothing_due_before_max_wait() -> None:
    p = make()
    p.add("r1", A, now=0.0)
    assert p.take(now=0.049) is None
    assert p.next_deadline() == pytest.approx(0.05)


def test_timed_flush_at_max_wait_from_oldest() -> None:
    p = make()
    p.add("r1", A, now=0.0)
    p.add("r2", A, now=0.04)
    batch = p.take(now=0.05)
    assert batch is not None and batch.items == ["r1", "r2"]
    assert len(p) == 0 and p.next_deadline() is None


def test_deadline_not_pushed_back_by_newer_arrivals() -> None:
    p = make()
    p.add("r1", A, now=0.0)
    for i in range(2):
        p.add(f"late{i}", A, now=0.03 + i * 0.01)
    assert p.next_deadline() == pytest.approx(0.05)


def test_size_flush_without_waiting() -> None:
    p = make(max_batch=4)
    for i in range(4):
        p.add(f"r{i}", A, now=0.001 * i)
    assert p.next_deadline() == pytest.approx(0.0)
    batch = p.take(now=0.004)
    assert batch is not None and batch.items == ["r0", "r1", "r2", "r3"]


def test_timer_restarts_from_leftover_after_flush() -> None:
    """After a flush, leftovers are timed from their own arrival, not the flush."""
    p = make(max_batch=2, max_wait=0.05)
    p.add("r0", A, now=0.0)
    p.add("r1", A, now=0.01)
    p.add("r2", A, now=0.02)
    first = p.take(now=0.02)
    assert first is not None and first.items == ["r0", "r1"]
    assert p.next_deadline() == pytest.approx(0.07)
    assert p.take(now=0.069) is None
    second = p.take(now=0.07)
    assert second is not None and second.items == ["r2"]


def test_fresh_wait_after_buffer_empties() -> None:
    p = make()
    p.add("r0", A, now=0.0)
    assert p.take(now=0.05) is not None
    p.add("r1", A, now=1.0)
    assert p.take(now=1.04) is None
    assert p.take(now=1.05) is not None


def test_fifo_within_key_oldest_first() -> None:
    p = make(max_batch=3)
    for i in range(7):
        p.add(f"r{i}", A, now=i * 0.001)
    out = []
    while (b := p.take(now=1.0)) is not None:
        out.append(b.items)
    assert out == [["r0", "r1", "r2"], ["r3", "r4", "r5"], ["r6"]]


def test_incompatible_requests_never_share_a_batch() -> None:
    p = make(max_batch=8)
    p.add("a0", A, now=0.0)
    p.add("b0", B, now=0.001)
    p.add("a1", A, now=0.002)
    first = p.take(now=0.1)
    second = p.take(now=0.1)
    assert first is not None and second is not None
    assert (first.key, first.items) == (A, ["a0", "a1"])
    assert (second.key, second.items) == (B, ["b0"])


def test_oldest_key_goes_first_among_ready() -> None:
    p = make(max_batch=2)
    p.add("b0", B, now=0.0)
    p.add("a0", A, now=0.01)
    p.add("a1", A, now=0.02)
    # A is full at 0.02, B is due at 0.05; at 0.06 both are ready: B is older.
    batch = p.take(now=0.06)
    assert batch is not None and batch.key == B


def test_full_key_flushes_before_an_older_partial_one_is_due() -> None:
    p = make(max_batch=2)
    p.add("b0", B, now=0.0)
    p.add("a0", A, now=0.01)
    p.add("a1", A, now=0.02)
    batch = p.take(now=0.02)
    assert batch is not None and batch.key == A


def test_multi_image_requests_count_images_and_stay_whole() -> None:
    p = make(max_batch=4)
    p.add("r0", A, now=0.0, images=3)
    p.add("r1", A, now=0.001, images=2)
    assert p.buffered_images == 5
    first = p.take(now=0.001)
    assert first is not None and first.items == ["r0"] and first.images == 3
    assert p.take(now=0.001) is None  # r1 alone (2 images) is neither full nor due
    assert p.take(now=0.052) is not None


def test_request_larger_than_batch_is_refused() -> None:
    with pytest.raises(ValueError):
        make(max_batch=2).add("big", A, now=0.0, images=3)


def test_discard_removes_revoked_and_keeps_order() -> None:
    p = make(max_batch=8)
    for i in range(4):
        p.add(f"r{i}", A, now=i * 0.001)
    assert p.discard(lambda r: r in {"r1", "r2"}) == ["r1", "r2"]
    batch = p.take(now=1.0)
    assert batch is not None and batch.items == ["r0", "r3"]
    assert p.buffered_images == 0


def test_drain_returns_everything_oldest_first() -> None:
    p = make(max_batch=8)
    p.add("b0", B, now=0.002)
    p.add("a0", A, now=0.0)
    p.add("a1", A, now=0.003)
    assert p.drain() == ["a0", "b0", "a1"]
    assert len(p) == 0


def test_zero_wait_flushes_immediately() -> None:
    p = make(max_wait=0.0)
    p.add("r0", A, now=5.0)
    assert p.take(now=5.0) is not None


def test_prefetch_window_holds_two_batches() -> None:
    assert prefetch_window(8) == 16
    assert prefetch_window(8, batches=3) == 24
    with pytest.raises(ValueError):
        prefetch_window(8, batches=1)
