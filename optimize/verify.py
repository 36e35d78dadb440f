"""Compare two UNet backends on fixed seeds and prompts.

Both backends draw the same images (prompt i with seed ``seed + i``, same
size, steps, sampler and guidance); the images are compared pixel by pixel
(PSNR, SSIM, largest difference in uint8 levels) and each backend is timed
(seconds per image, after one warm-up batch that is not counted). An optional
scorer adds task metrics per backend (see ``quality.load_scorer``).
"""
from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from PIL import Image

from imagegenx.engine.base import BatchSpec, Sample
from imagegenx.engine.diffusion import DiffusionEngine
from optimize.quality import Scorer, max_abs_diff, psnr, ssim

# Held out from the calibration prompts, so quantized backends are not judged on what they were fitted to.
EVAL_PROMPTS: tuple[str, ...] = (
    "a blue triangle on a yellow background",
    "a red square and a green circle side by side",
    "a lighthouse at dusk with a purple sky",
    "a bowl of oranges on a wooden table, soft light",
    "a snowy street with street lamps at night",
    "a portrait of a woman in a red coat, film photo",
    "a small white boat on a calm green lake",
    "an orange circle above a black rectangle",
)


@dataclass(frozen=True)
class RunSettings:
    num_images: int = 4
    steps: int = 20
    sampler: str = "euler"
    guidance: float = 7.5
    seed: int = 0
    batch: int = 4
    width: int | None = None  # None: the model's native size
    height: int | None = None


@dataclass(frozen=True)
class ImageComparison:
    seed: int
    prompt: str
    psnr: float
    ssim: float
    max_abs_diff: int


@dataclass
class BackendRun:
    name: str
    images: list[Image.Image]
    seconds_per_image: float
    warmup_s: float
    scores: dict[str, float] = field(default_factory=dict)


@dataclass
class VerifyReport:
    a: BackendRun
    b: BackendRun
    rows: list[ImageComparison]
    settings: RunSettings
    device: str
    model: str

    @property
    def mean_psnr(self) -> float:
        return sum(r.psnr for r in self.rows) / len(self.rows)

    @property
    def mean_ssim(self) -> float:
        return sum(r.ssim for r in self.rows) / len(self.rows)

    @property
    def worst_abs_diff(self) -> int:
        return max(r.max_abs_diff for r in self.rows)


def prompts_for(n: int, prompts: Sequence[str] = EVAL_PROMPTS) -> list[str]:
    return [prompts[i % len(prompts)] for i in range(n)]


def evaluation_set(name: str, n: int) -> list[str]:
    """``n`` evaluation prompts of a prompt set: for ``shapes`` the shapes benchmark's held-out
    prompts (never in training or in the shapes calibration file), else ``EVAL_PROMPTS``."""
    if name == "shapes":
        from imagegenx.shapes.captions import evaluation_prompts

        return evaluation_prompts(n, held_out=True)
    return prompts_for(n)


def _sync(engine: DiffusionEngine) -> None:
    if engine.device.type == "cuda":
        torch.cuda.synchronize(engine.device)


def draw(engine: DiffusionEngine, prompts: Sequence[str], run: RunSettings) -> tuple[list[Image.Image], float, float]:
    """(images, seconds per image, warm-up seconds) of ``prompts`` with seeds ``run.seed + i``."""
    width, height = run.width or engine.native_size[0], run.height or engine.native_size[1]

    def spec(first: int, count: int, steps: int) -> BatchSpec:
        samples = tuple(Sample(prompt=prompts[i], seed=run.seed + i, guidance_scale=run.guidance)
                        for i in range(first, first + count))
        return BatchSpec(width=width, height=height, steps=steps, sampler=run.sampler, samples=samples)

    t0 = time.perf_counter()
    engine.generate(spec(0, min(run.batch, len(prompts)), 1))  # warm-up: first-call costs
    _sync(engine)
    warmup = time.perf_counter() - t0
    images: list[Image.Image] = []
    t0 = time.perf_counter()
    for first in range(0, len(prompts), run.batch):
        out = engine.generate(spec(first, min(run.batch, len(prompts) - first), run.steps))
        images.extend(img for img in out if img is not None)
    _sync(engine)
    return images, (time.perf_counter() - t0) / len(prompts), warmup


def compare_images(a: Sequence[Image.Image], b: Sequence[Image.Image], prompts: Sequence[str],
                   seed: int) -> list[ImageComparison]:
    return [ImageComparison(seed + i, p, psnr(x, y), ssim(x, y), max_abs_diff(x, y))
            for i, (x, y, p) in enumerate(zip(a, b, prompts, strict=True))]


def run_backend(name: str, engine: DiffusionEngine, prompts: Sequence[str], run: RunSettings,
                scorer: Scorer | None = None) -> BackendRun:
    images, per_image, warmup = draw(engine, prompts, run)
    scores = {k: float(v) for k, v in scorer(images, list(prompts)).items()} if scorer else {}
    return BackendRun(name, images, per_image, warmup, scores)


def _fmt(x: float, digits: int) -> str:
    return "inf" if math.isinf(x) else f"{x:.{digits}f}"


def format_table(report: VerifyReport) -> str:
    s = report.settings
    w, h = report.a.images[0].size
    lines = [
        f"{report.a.name} vs {report.b.name}: model {report.model}, {len(report.rows)} images {w}x{h}, "
        f"{s.steps} steps {s.sampler}, guidance {s.guidance}, device {report.device}",
        f"{'seed':>6}  {'prompt':<44} {'PSNR dB':>8} {'SSIM':>7} {'max|diff|':>9}",
    ]
    for r in report.rows:
        prompt = r.prompt if len(r.prompt) <= 44 else r.prompt[:41] + "..."
        lines.append(f"{r.seed:>6}  {prompt:<44} {_fmt(r.psnr, 2):>8} {r.ssim:>7.4f} {r.max_abs_diff:>9}")
    lines.append(f"{'mean':>6}  {'':<44} {_fmt(report.mean_psnr, 2):>8} {report.mean_ssim:>7.4f} "
                 f"{report.worst_abs_diff:>9}")
    lines.append("")
    lines.append(f"{'backend':<16} {'s/image':>9} {'warm-up s':>10}" +
                 "".join(f" {k:>12}" for k in sorted(report.a.scores)))
    for run in (report.a, report.b):
        lines.append(f"{run.name:<16} {run.seconds_per_image:>9.4f} {run.warmup_s:>10.2f}" +
                     "".join(f" {run.scores.get(k, float('nan')):>12.4f}" for k in sorted(report.a.scores)))
    return "\n".join(lines)


def _json_number(x: float) -> float | str:
    return str(x) if math.isinf(x) or math.isnan(x) else x


def to_json(report: VerifyReport) -> dict[str, Any]:
    """Everything in the table, JSON-safe (an infinite PSNR is written as "inf")."""
    rows = [{**asdict(r), "psnr": _json_number(r.psnr)} for r in report.rows]
    return {
        "a": report.a.name, "b": report.b.name, "model": report.model, "device": report.device,
        "settings": asdict(report.settings), "images": rows,
        "mean_psnr": _json_number(report.mean_psnr), "mean_ssim": report.mean_ssim,
        "max_abs_diff": report.worst_abs_diff,
        "seconds_per_image": {report.a.name: report.a.seconds_per_image, report.b.name: report.b.seconds_per_image},
        "warmup_s": {report.a.name: report.a.warmup_s, report.b.name: report.b.warmup_s},
        "scores": {report.a.name: report.a.scores, report.b.name: report.b.scores},
    }
