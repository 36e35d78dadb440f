"""The contract between the batching worker and any image engine.

The worker hands an engine one *batch*: samples that share the settings the
batching policy keys on (size, steps, sampler, model, LoRAs), while prompt, seed and
guidance vary per sample. Keeping this contract free of torch lets the worker,
the API and the benchmarks use it without importing a deep-learning stack.
"""
from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from PIL import Image


@dataclass(frozen=True)
class Sample:
    """One image to draw (a row of a UNet call; ``imagegenx.request_state`` has
    the worker's vocabulary): everything that may differ inside a batch."""

    prompt: str
    seed: int
    guidance_scale: float = 7.5
    negative_prompt: str = ""
    # Fractions of the trajectory whose steps run classifier-free guidance
    # (imagegenx.guidance); outside it, and at a scale <= 1, the conditional row only.
    guidance_interval: tuple[float, float] = (0.0, 1.0)


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


@runtime_checkable
class Denoising(Protocol):
    """One request's images inside a step engine: its own trajectory state.

    Each request keeps its own schedule, step index and sampler state, so it
    can join a running set of rows at any step and leave when its own steps
    are done.
    """

    @property
    def rows(self) -> int:
        """Images of the request."""

    @property
    def unet_rows(self) -> int:
        """UNet rows its next step runs: two per guided image, one per other image."""

    @property
    def reserved_rows(self) -> int:
        """The most UNet rows any of its remaining steps runs (never rises)."""

    @property
    def steps(self) -> int:
        """Denoising steps the request asked for."""

    @property
    def index(self) -> int:
        """Steps done so far."""

    @property
    def done(self) -> bool:
        """All of its steps are done: it is ready to decode."""


@runtime_checkable
class StepEngine(Protocol):
    """An engine the step scheduler drives one UNet call at a time.

    ``spec`` here is one request: its samples are the request's images. Every
    state given to one ``step`` call shares width, height and LoRA set (the
    scheduler's group); steps, sampler, guidance, seeds and prompts differ.
    ``step`` is all or nothing: when it raises, no state has moved, so the
    caller may retry the same states, alone or in other company.
    """

    def begin(self, spec: BatchSpec) -> Denoising:
        """Prepare a request's trajectory: prompt embeddings, noise, schedule."""

    def step(self, states: Sequence[Denoising]) -> None:
        """Advance every state by one of its own steps, in one model call."""

    def decode(self, states: Sequence[Denoising]) -> list[list[Image.Image]]:
        """Images of finished states (decoded together), one list per state."""


class PendingDecode(Protocol):
    """A decode the device may still be running (``start_decode``): the step loop
    goes on with the other rows and collects the images once ``ready``."""

    def ready(self) -> bool:
        """Whether ``result`` returns without waiting for the device."""

    def result(self) -> list[list[Image.Image] | Exception]:
        """Per state, its images or why it could not be decoded (waits until ready).

        Raises when the whole decode failed (the caller decodes each state alone)."""


class DecodedNow:
    """A decode that ran on the host's time: ready at once."""

    def __init__(self, images: list[list[Image.Image] | Exception]) -> None:
        self._images = images

    def ready(self) -> bool:
        return True

    def result(self) -> list[list[Image.Image] | Exception]:
        return self._images


def start_decode(engine: StepEngine, states: Sequence[Denoising]) -> PendingDecode:
    """Decode ``states`` together: on the engine's own stream where it has one
    (``start_decode``), otherwise now with ``decode``. Raises as ``decode`` does."""
    start = getattr(engine, "start_decode", None)
    if start is not None:
        return start(states)
    return DecodedNow(list(engine.decode(states)))


def is_step_engine(engine: object) -> bool:
    return all(callable(getattr(engine, name, None)) for name in ("begin", "step", "decode"))
