"""A stand-in engine with a chosen cost model, for measuring the system itself.

It draws a cheap deterministic picture per sample (a gradient derived from the
seed and prompt) and sleeps as long as a real GPU would take for the batch.
Figures measured with it are labelled *synthetic* wherever they appear.
"""
from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image

from imagegenx.engine.base import BatchSpec, Sample, StepCallback

SAMPLERS = ("euler", "euler_a", "ddim", "dpmpp_2m")


@dataclass(frozen=True)
class CostModel:
    """Seconds for one denoise step of n images, and for decoding n images."""

    step_fixed_s: float
    step_per_image_s: float
    decode_per_image_s: float

    def step_s(self, n: int) -> float:
        return self.step_fixed_s + self.step_per_image_s * n

    def batch_s(self, n: int, steps: int) -> float:
        return steps * self.step_s(n) + self.decode_per_image_s * n


COST_MODELS: dict[str, CostModel] = {
    # No cost at all: isolates the queue path.
    "zero": CostModel(0.0, 0.0, 0.0),
    # Compiled SD1.5 UNet with CFG on one H200 (DESIGN.md): 13 + 3.3 n ms per step,
    # 13 ms per image to decode.
    "sd15-h200": CostModel(0.013, 0.0033, 0.013),
}


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
    ) -> None:
        self.cost = COST_MODELS[cost] if isinstance(cost, str) else cost
        self._native = native
        self._sleep = sleep

    @property
    def native_size(self) -> tuple[int, int]:
        return self._native

    @property
    def samplers(self) -> tuple[str, ...]:
        return SAMPLERS

    def generate(self, spec: BatchSpec, on_step: StepCallback | None = None) -> list[Image.Image | None]:
        live = list(range(len(spec.samples)))
        if on_step is not None:
            dropped = set(on_step(0, spec.steps))
            live = [i for i in live if i not in dropped]
        for step in range(spec.steps):
            if not live:
                break
            delay = self.cost.step_s(len(live))
            if delay:
                self._sleep(delay)
            if on_step is not None:
                dropped = set(on_step(step + 1, spec.steps))
                live = [i for i in live if i not in dropped]
        decode = self.cost.decode_per_image_s * len(live)
        if decode:
            self._sleep(decode)
        out: list[Image.Image | None] = [None] * len(spec.samples)
        for i in live:
            out[i] = _picture(spec.samples[i], spec.width, spec.height)
        return out
