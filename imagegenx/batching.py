"""Batch formation policy: which requests may share a batch, and when to flush.

Pure logic: the caller passes ``now`` (a monotonic clock reading), so tests
drive it with a fake clock. No Celery, kombu or torch here.

Rules:
- Requests are grouped by a compatibility key (model, width, height, steps,
  sampler, LoRA set); only requests with equal keys share a batch.
- A key is ready when its buffered images reach ``max_batch``, or when its
  OLDEST buffered request has waited ``max_wait`` seconds. The deadline is
  always derived from the oldest item still buffered, so there is no timer to
  forget to reset after a flush.
- Within a key, requests leave in arrival order (FIFO); among ready keys the
  one whose head waited longest goes first.
- A batch never exceeds ``max_batch`` images (a request's images stay together).
"""
from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class BatchKey:
    """Settings that must be equal for requests to share one denoise loop."""

    model: str
    width: int
    height: int
    steps: int
    sampler: str
    # (name, weight) pairs sorted by name: the engine merges one LoRA set per batch.
    loras: tuple[tuple[str, float], ...] = ()


@dataclass
class _Queued(Generic[T]):
    """The policy's own bookkeeping of a buffered item (never handed out)."""

    item: T
    images: int
    arrived: float


@dataclass
class Batch(Generic[T]):
    """What the policy hands out: one key's items in arrival order, and their images."""

    key: Hashable
    items: list[T] = field(default_factory=list)
    images: int = 0


class BatchPolicy(Generic[T]):
    """Buffers items per key and hands out batches when the rules above say so."""

    def __init__(self, max_batch: int, max_wait: float) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        if max_wait < 0:
            raise ValueError("max_wait must be >= 0")
        self.max_batch = max_batch
        self.max_wait = max_wait
        self._queues: OrderedDict[Hashable, deque[_Queued[T]]] = OrderedDict()
        self._images: dict[Hashable, int] = {}

    # -- buffering ---------------------------------------------------------
    def add(self, item: T, key: Hashable, now: float, images: int = 1) -> None:
        if not 1 <= images <= self.max_batch:
            raise ValueError(f"a request of {images} images cannot fit a batch of {self.max_batch}")
        self._queues.setdefault(key, deque()).append(_Queued(item, images, now))
        self._images[key] = self._images.get(key, 0) + images

    def __len__(self) -> int:
        return sum(len(q) for q in self._queues.values())

    @property
    def buffered_images(self) -> int:
        return sum(self._images.values())

    def __iter__(self) -> Iterator[T]:
        """The buffered items."""
        for q in self._queues.values():
            yield from (p.item for p in q)

    # -- timing ------------------------------------------------------------
    def _ready(self, key: Hashable, now: float) -> bool:
        queue = self._queues[key]
        return self._images[key] >= self.max_batch or now - queue[0].arrived >= self.max_wait

    def next_deadline(self) -> float | None:
        """Monotonic time at which some key becomes due, or None if empty.

        A key that is already full is due at once (its oldest arrival).
        """
        deadlines = []
        for key, queue in self._queues.items():
            oldest = queue[0].arrived
            deadlines.append(oldest if self._images[key] >= self.max_batch else oldest + self.max_wait)
        return min(deadlines, default=None)

    # -- flushing ----------------------------------------------------------
    def take(self, now: float) -> Batch[T] | None:
        """Remove and return the next due batch, or None if nothing is due."""
        ready = [k for k in self._queues if self._ready(k, now)]
        if not ready:
            return None
        key = min(ready, key=lambda k: self._queues[k][0].arrived)
        return self._pop(key)

    def _pop(self, key: Hashable) -> Batch[T]:
        queue = self._queues[key]
        batch: Batch[T] = Batch(key)
        size = 0
        while queue and size + queue[0].images <= self.max_batch:
            queued = queue.popleft()
            size += queued.images
            batch.items.append(queued.item)
        batch.images = size
        self._images[key] -= size
        if not queue:
            del self._queues[key]
            del self._images[key]
        return batch

    def discard(self, predicate: Callable[[T], bool]) -> list[T]:
        """Remove (and return) every buffered item for which predicate is true."""
        removed: list[T] = []
        for key in list(self._queues):
            queue = self._queues[key]
            keep = deque(p for p in queue if not predicate(p.item))
            for p in queue:
                if predicate(p.item):
                    removed.append(p.item)
                    self._images[key] -= p.images
            if keep:
                self._queues[key] = keep
            else:
                del self._queues[key]
                del self._images[key]
        return removed

    def drain(self) -> list[T]:
        """Remove everything, oldest first (used on shutdown to requeue)."""
        queued = sorted((p for q in self._queues.values() for p in q), key=lambda p: p.arrived)
        self._queues.clear()
        self._images.clear()
        return [p.item for p in queued]


def prefetch_window(max_batch: int, batches: int = 2) -> int:
    """Messages a worker must be allowed to hold unacknowledged.

    With late acks, buffered and running messages both count against the
    broker's prefetch limit; below 2 x max_batch the next batch cannot form
    while one runs and the batch size is silently capped.
    """
    if batches < 2:
        raise ValueError("at least two batches must fit the prefetch window")
    return max_batch * batches
