"""A stand-in engine with a chosen cost model, for measuring the system itself.

It draws a cheap deterministic picture per sample (a gradient derived from the
seed and prompt) and sleeps as long as a real GPU would take for the batch.
Figures measured with it are labelled *synthetic* wherever they appear.

As a testing aid it can also inject faults (setting ``synthetic_faults``), so
that the worker's failure handling is exercised through the real queue path:

- ``raise:MARKER``: a batch holding a prompt that contains MARKER raises
  (a request that breaks its batch);
- ``oom:K``: a batch of more than K images raises an out-of-memory error
  (``OutOfMemoryError``, a ``MemoryError``, as a GPU that runs out would);
- ``exit:MARKER``: a batch holding a prompt that contains MARKER kills the
  worker process with SIGKILL after its first step (a crash no code survives);
- ``device:MARKER``: a batch holding a prompt that contains MARKER loses the
  device: it raises ``AcceleratorError``, and so does every later call of the
  engine (``begin``, ``step``, ``decode``, ``generate``), as a CUDA context does
  after an illegal memory access.

Entries are comma-separated, e.g. ``raise:POISON,oom:4``.
"""
from __future__ import annotations

import hashlib
import os
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from imagegenx import guidance
from imagegenx.engine.base import BatchSpec, Sample, StepCallback
from imagegenx.engine.buckets import split_rows
from imagegenx.preview import ReadyFrames

SAMPLERS = ("euler", "euler_a", "ddim", "dpmpp_2m")


@dataclass(frozen=True)
class CostModel:
    """Seconds for one UNet call, and for decoding n images.

    The figures are stated per *image* with classifier-free guidance (two UNet
    rows), as they were measured: linear (``step_fixed_s + step_per_image_s *
    n``) or, with ``step_buckets``, a table of (images bucket, seconds) per
    padded call. A call is priced by its UNet rows (:meth:`rows_s`): an image
    outside its guidance interval runs one row, half an image's share; one
    row is priced as two, since the fast path runs it padded to two.
    """

    step_fixed_s: float
    step_per_image_s: float
    decode_per_image_s: float
    step_buckets: tuple[tuple[int, float], ...] = ()
    decode_fixed_s: float = 0.0

    def step_s(self, n: int) -> float:
        """One step of ``n`` images, all of them guided (2 UNet rows each)."""
        return self.rows_s(2 * n)

    def rows_s(self, rows: int) -> float:
        """One UNet call of ``rows`` UNet rows."""
        if self.step_buckets:
            table = {2 * b: s for b, s in self.step_buckets}
            table.setdefault(1, table[min(table)])
            return sum(table[b] for _, _, b in split_rows(rows, sorted(table)))
        return self.step_fixed_s + self.step_per_image_s * rows / 2

    def decode_s(self, n: int) -> float:
        return self.decode_fixed_s + self.decode_per_image_s * n if n else 0.0

    def batch_s(self, n: int, steps: int) -> float:
        return steps * self.step_s(n) + self.decode_s(n)


COST_MODELS: dict[str, CostModel] = {
    # No cost at all: isolates the queue path.
    "zero": CostModel(0.0, 0.0, 0.0),
    # Compiled SD1.5 UNet with CFG on one H200 (DESIGN.md): 13 + 3.3 n ms per step,
    # 13 ms per image to decode.
    "sd15-h200": CostModel(0.013, 0.0033, 0.013),
    # The same UNet with CUDA graphs, measured per bucket on one H200 (bench.step_profile,
    # docs/benchmarks/step_profile_h200.json; 16 and 32 from DESIGN's compiled batch-32
    # figure); decode 15.7 ms for one image, about 12.7 ms per image in a batch.
    "sd15-h200-graphs": CostModel(0.0, 0.0, 0.0127, step_buckets=(
        (1, 0.0060), (2, 0.0094), (4, 0.0175), (8, 0.0337), (16, 0.066), (32, 0.131)),
        decode_fixed_s=0.003),
}


class OutOfMemoryError(MemoryError):
    """The synthetic stand-in for a GPU out-of-memory error."""


class InjectedFault(RuntimeError):
    """A failure the synthetic engine was configured to raise."""


class AcceleratorError(RuntimeError):
    """The synthetic stand-in for ``torch.AcceleratorError`` (a CUDA error), told
    apart by its name as torch's is (``imagegenx.errors.is_device_error``)."""


@dataclass(frozen=True)
class Faults:
    """Faults to inject; see the module docstring for the syntax."""

    raise_markers: tuple[str, ...] = ()
    exit_markers: tuple[str, ...] = ()
    oom_above: int | None = None
    spec: str = field(default="", compare=False)
    device_markers: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.raise_markers or self.exit_markers or self.device_markers
                    or self.oom_above is not None)


def parse_faults(spec: str) -> Faults:
    """Parse ``kind:arg`` entries; ValueError names a bad one."""
    raise_markers: list[str] = []
    exit_markers: list[str] = []
    device_markers: list[str] = []
    oom_above: int | None = None
    for entry in (e.strip() for e in spec.split(",")):
        if not entry:
            continue
        kind, sep, arg = entry.partition(":")
        if not sep or not arg:
            raise ValueError(f"synthetic fault {entry!r}: expected kind:argument")
        if kind == "raise":
            raise_markers.append(arg)
        elif kind == "exit":
            exit_markers.append(arg)
        elif kind == "device":
            device_markers.append(arg)
        elif kind == "oom":
            if not arg.isdigit() or int(arg) < 1:
                raise ValueError(f"synthetic fault {entry!r}: oom takes a number of images >= 1")
            oom_above = int(arg)
        else:
            raise ValueError(f"synthetic fault {entry!r}: kind must be raise, oom, exit or device")
    return Faults(tuple(raise_markers), tuple(exit_markers), oom_above, spec, tuple(device_markers))


def _marked(samples: Sequence[Sample], markers: tuple[str, ...]) -> str | None:
    for sample in samples:
        for marker in markers:
            if marker in sample.prompt:
                return marker
    return None


def _rows_at(samples: Sequence[Sample], index: int, steps: int) -> int:
    """UNet rows of ``samples`` at step ``index``: two per guided image, one otherwise."""
    return sum(guidance.rows_at(s.guidance_scale, s.guidance_interval, index, steps) for s in samples)


@dataclass
class SyntheticDenoising:
    """One request's trajectory in the synthetic engine: only its step count."""

    spec: BatchSpec
    index: int = 0

    @property
    def rows(self) -> int:
        return len(self.spec.samples)

    @property
    def unet_rows(self) -> int:
        return _rows_at(self.spec.samples, self.index, self.spec.steps)

    @property
    def reserved_rows(self) -> int:
        return sum(guidance.reserved_rows(s.guidance_scale, s.guidance_interval, self.index, self.spec.steps)
                   for s in self.spec.samples)

    @property
    def steps(self) -> int:
        return self.spec.steps

    @property
    def done(self) -> bool:
        return self.index >= self.spec.steps


def _picture(sample: Sample, width: int, height: int) -> Image.Image:
    digest = hashlib.sha256(f"{sample.seed}:{sample.prompt}".encode()).digest()
    c0 = np.frombuffer(digest[:3], dtype=np.uint8).astype(np.float32)
    c1 = np.frombuffer(digest[3:6], dtype=np.uint8).astype(np.float32)
    t = np.linspace(0.0, 1.0, width, dtype=np.float32)[None, :, None]
    row = (c0 * (1 - t) + c1 * t).astype(np.uint8)
    return Image.fromarray(np.repeat(row, height, axis=0), "RGB")


class SyntheticEngine:
    """Engine protocol implementation whose cost follows a CostModel."""

    name = "synthetic"

    def __init__(
        self,
        cost: CostModel | str = "zero",
        native: tuple[int, int] = (64, 64),
        sleep: Callable[[float], None] = time.sleep,
        faults: Faults | str = "",
    ) -> None:
        self.cost = COST_MODELS[cost] if isinstance(cost, str) else cost
        self._native = native
        self._sleep = sleep
        self.faults = parse_faults(faults) if isinstance(faults, str) else faults
        # UNet rows run so far (two per guided image and step, one otherwise).
        self.unet_rows_run = 0
        # Set once a ``device:`` fault fired: every later call raises it again.
        self.lost: str | None = None

    @property
    def native_size(self) -> tuple[int, int]:
        return self._native

    @property
    def samplers(self) -> tuple[str, ...]:
        return SAMPLERS

    def _inject(self, spec: BatchSpec) -> str | None:
        """Raise the configured faults for this batch; returns an exit marker, if any."""
        return self._inject_samples(spec.samples)

    def _inject_samples(self, samples: Sequence[Sample]) -> str | None:
        f = self.faults
        if not f:
            return None
        self._check_device()
        marker = _marked(samples, f.device_markers)
        if marker is not None:
            self.lost = f"CUDA error: an illegal memory access was encountered (a prompt contains {marker!r})"
            raise AcceleratorError(self.lost)
        marker = _marked(samples, f.raise_markers)
        if marker is not None:
            raise InjectedFault(f"injected fault: a prompt contains {marker!r}")
        n = len(samples)
        if f.oom_above is not None and n > f.oom_above:
            raise OutOfMemoryError(
                f"out of memory: {n} images exceed the injected limit of {f.oom_above}"
            )
        return _marked(samples, f.exit_markers)

    def device_usable(self) -> bool:
        """The probe after a device error: false once a ``device:`` fault fired."""
        return self.lost is None

    def _check_device(self) -> None:
        if self.lost is not None:
            raise AcceleratorError(self.lost)

    # -- step API (the step scheduler) ------------------------------------------
    def begin(self, spec: BatchSpec) -> SyntheticDenoising:
        self._check_device()
        return SyntheticDenoising(spec)

    def step(self, states: Sequence[SyntheticDenoising]) -> None:
        """One UNet call of every state's UNet rows: it costs ``rows_s(rows)``.

        Faults are checked before anything moves, so a failed call leaves
        every state as it was.
        """
        samples = [s for state in states for s in state.spec.samples]
        exit_marker = self._inject_samples(samples)
        rows = sum(state.unet_rows for state in states)
        delay = self.cost.rows_s(rows)
        if delay:
            self._sleep(delay)
        if exit_marker is not None:  # dies mid-run, as a crashed process would
            os.kill(os.getpid(), signal.SIGKILL)
        self.unet_rows_run += rows
        for state in states:
            state.index += 1

    def preview(self, states: Sequence[SyntheticDenoising]) -> ReadyFrames:
        """Previews at an eighth of the size: grey fading into the final picture
        as the steps go (a stand-in for the latent projection; it costs nothing)."""
        frames = []
        for st in states:
            w, h = max(8, st.spec.width // 8), max(8, st.spec.height // 8)
            t = min(1.0, st.index / max(1, st.spec.steps))
            pics = [np.asarray(_picture(s, w, h), dtype=np.float32) for s in st.spec.samples]
            frames.append(np.stack([(128 * (1 - t) + p * t).astype(np.uint8) for p in pics]))
        return ReadyFrames(frames)

    def step_seconds(self, rows: int) -> float:
        """What one call of ``rows`` UNet rows costs (the step scheduler's cost model)."""
        return self.cost.rows_s(rows)

    def decode(self, states: Sequence[SyntheticDenoising]) -> list[list[Image.Image]]:
        self._check_device()
        delay = self.cost.decode_s(sum(state.rows for state in states))
        if delay:
            self._sleep(delay)
        return [[_picture(s, st.spec.width, st.spec.height) for s in st.spec.samples]
                for st in states]

    def generate(self, spec: BatchSpec, on_step: StepCallback | None = None) -> list[Image.Image | None]:
        exit_marker = self._inject(spec)
        live = list(range(len(spec.samples)))
        if on_step is not None:
            dropped = set(on_step(0, spec.steps))
            live = [i for i in live if i not in dropped]
        for step in range(spec.steps):
            if not live:
                break
            rows = _rows_at([spec.samples[i] for i in live], step, spec.steps)
            self.unet_rows_run += rows
            delay = self.cost.rows_s(rows)
            if delay:
                self._sleep(delay)
            if exit_marker is not None:  # dies mid-batch, as a crashed process would
                os.kill(os.getpid(), signal.SIGKILL)
            if on_step is not None:
                dropped = set(on_step(step + 1, spec.steps))
                live = [i for i in live if i not in dropped]
        decode = self.cost.decode_s(len(live))
        if decode:
            self._sleep(decode)
        out: list[Image.Image | None] = [None] * len(spec.samples)
        for i in live:
            out[i] = _picture(spec.samples[i], spec.width, spec.height)
        return out
