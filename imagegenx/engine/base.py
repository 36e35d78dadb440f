"""The contract between the batching worker and any image engine.

The worker hands an engine one *batch*: samples that share the settings the
batching policy keys on (size, steps, sampler, model, LoRAs), while prompt, seed and
guidance vary per sample. Keeping this contract free of torch lets the worker,
the API and the benchmarks use it without importing a deep-learning stack.
"""
from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from PIL import Image


@dataclass(frozen=True)
class Sample:
    """One image to draw: everything that may differ inside a batch."""

    prompt: str
    seed: int
    guidance_scale: float = 7.5
    negative_prompt: str = ""


@dataclass(frozen=True)
class BatchSpec:
    """Settings shared by every sample of a batch (the compatibility key)."""

    width: int
    height: int
    steps: int
    sampler: str
    samples: tuple[Sample, ...] = field(default_factory=tuple)
    # LoRAs merged into the model for this batch: (name, weight), sorted by name.
    loras: tuple[tuple[str, float], ...] = ()


# Called at every step boundary with (steps_done, steps_total): once before the
# first step (0) and after each step. It returns the
# indices (into BatchSpec.samples) that must leave the batch now, e.g. because
# their request was revoked; the engine stops computing them and returns None
# in their place.
StepCallback = Callable[[int, int], Collection[int]]


@runtime_checkable
class Engine(Protocol):
    """What the worker needs from an engine."""

    name: str

    @property
    def native_size(self) -> tuple[int, int]:
        """(width, height) the served model was trained at."""

    @property
    def samplers(self) -> tuple[str, ...]:
        """Sampler names this engine accepts in BatchSpec.sampler."""

    def generate(
        self, spec: BatchSpec, on_step: StepCallback | None = None
    ) -> list[Image.Image | None]:
        """Draw every sample of ``spec``; RGB images of spec.width x spec.height.

        A sample's image depends on its own seed and settings only, never on
        the other samples of the batch, so a seed gives the same picture alone
        or batched.
        """
