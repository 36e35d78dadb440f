"""What the TensorRT build and the TensorRT backend share, importable without TensorRT.

TensorRT is imported only by ``import_tensorrt``; everything else here is plain
logic (profile ranges, dtype names, build progress) so it can be tested on
machines that have no TensorRT, which includes every machine this project's CI
runs on.
"""
from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

TRT_MISSING_REASON = "TensorRT is not installed: no wheel or library is reachable from these machines"


class TensorRTUnavailable(RuntimeError):
    """TensorRT cannot be imported here."""


class BatchOutsideProfile(ValueError):
    """A batch the TensorRT engine was not built for."""


def tensorrt_available() -> bool:
    return importlib.util.find_spec("tensorrt") is not None


def import_tensorrt() -> ModuleType:
    """The ``tensorrt`` module, or TensorRTUnavailable saying why not."""
    try:
        return importlib.import_module("tensorrt")
    except ImportError as exc:  # also a wheel whose libnvinfer is missing
        raise TensorRTUnavailable(
            f"TensorRT cannot be imported ({exc}); install TensorRT 10 or newer "
            "(the `tensorrt` Python package and its libraries)"
        ) from None


def trt_major(trt: ModuleType) -> int:
    return int(str(trt.__version__).split(".")[0])


# TensorRT data type names (trt.DataType.X.name) -> torch dtype names.
TORCH_DTYPE_OF_TRT: dict[str, str] = {
    "FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT8": "int8", "UINT8": "uint8",
    "INT32": "int32", "INT64": "int64", "BOOL": "bool", "FP8": "float8_e4m3fn",
}


def torch_dtype(trt_dtype: Any) -> Any:
    """The torch dtype of a TensorRT tensor type."""
    import torch

    name = getattr(trt_dtype, "name", str(trt_dtype).rsplit(".", 1)[-1])
    try:
        return getattr(torch, TORCH_DTYPE_OF_TRT[name])
    except KeyError:
        raise TypeError(f"TensorRT tensor type {name} has no torch equivalent here") from None


@dataclass(frozen=True)
class BatchProfile:
    """Batch rows (the first axis) one optimization profile covers."""

    min_rows: int
    opt_rows: int
    max_rows: int
    rows_per_image: int = 2  # classifier-free guidance: an uncond and a cond row per image

    def __post_init__(self) -> None:
        if not 1 <= self.min_rows <= self.opt_rows <= self.max_rows:
            raise ValueError(f"profile needs 1 <= min <= opt <= max, got "
                             f"{self.min_rows}/{self.opt_rows}/{self.max_rows}")

    def covers(self, rows: int) -> bool:
        return self.min_rows <= rows <= self.max_rows

    def check(self, rows: int) -> None:
        """Raise BatchOutsideProfile with what to do when ``rows`` is not covered."""
        if self.covers(rows):
            return
        per = self.rows_per_image
        images = f" ({rows // per} images with CFG)" if per > 1 and rows % per == 0 else ""
        raise BatchOutsideProfile(
            f"UNet batch of {rows} rows{images} is outside the TensorRT engine's optimization profile "
            f"({self.min_rows} to {self.max_rows} rows, i.e. up to "
            f"{self.max_rows // per} images with CFG): rebuild the engine with `imagegenx optimize build "
            f"--buckets` covering this batch, or keep IMAGEGENX_MAX_BATCH within the profile"
        )


def profile_for_buckets(buckets: Sequence[int], opt_images: int | None = None,
                        rows_per_image: int = 2) -> BatchProfile:
    """One profile from the smallest to the largest batch bucket (in images).

    The worker runs batches of 1..max_batch images; with CFG the UNet sees up to
    twice as many rows, and as few as one per image (an image outside its
    guidance interval, or at guidance_scale <= 1), so the profile starts at one
    row per smallest bucket. ``opt_images`` (default: the middle bucket) is the
    size TensorRT tunes its kernels for.
    """
    if not buckets or any(b < 1 for b in buckets) or list(buckets) != sorted(set(buckets)):
        raise ValueError(f"buckets must be distinct positive sizes in ascending order, got {list(buckets)}")
    opt = buckets[len(buckets) // 2] if opt_images is None else opt_images
    if not buckets[0] <= opt <= buckets[-1]:
        raise ValueError(f"opt batch {opt} is outside the buckets {buckets[0]}..{buckets[-1]}")
    return BatchProfile(buckets[0], rows_per_image * opt, rows_per_image * buckets[-1],
                        rows_per_image=rows_per_image)


class PhaseProgress:
    """Build progress as nested bars, one per TensorRT build phase.

    Implements the three callbacks of ``trt.IProgressMonitor``; a thin subclass
    made by ``progress_monitor`` forwards to it, so this logic needs no TensorRT.
    """

    def __init__(self, make_bar: Callable[..., Any] | None = None) -> None:
        if make_bar is None:
            from tqdm import tqdm

            make_bar = tqdm
        self._make_bar = make_bar
        self._bars: dict[str, Any] = {}
        self._depth: dict[str, int] = {}
        self.cancelled = False

    def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
        depth = self._depth.get(parent_phase, -1) + 1 if parent_phase else 0
        self._depth[phase_name] = depth
        self._bars[phase_name] = self._make_bar(total=num_steps, desc=phase_name, position=depth,
                                                leave=depth == 0, unit="step")

    def step_complete(self, phase_name: str, step: int) -> bool:
        bar = self._bars.get(phase_name)
        if bar is not None:
            bar.n = step + 1
            bar.refresh()
        return not self.cancelled  # False asks TensorRT to stop the build

    def phase_finish(self, phase_name: str) -> None:
        bar = self._bars.pop(phase_name, None)
        self._depth.pop(phase_name, None)
        if bar is not None:
            bar.n = bar.total or bar.n
            bar.close()


def progress_monitor(trt: ModuleType, progress: PhaseProgress) -> Any:
    """A ``trt.IProgressMonitor`` forwarding to ``progress`` (class made lazily: needs TensorRT)."""

    class _Monitor(trt.IProgressMonitor):  # type: ignore[name-defined,misc]
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            progress.phase_start(phase_name, parent_phase, num_steps)

        def step_complete(self, phase_name: str, step: int) -> bool:
            return progress.step_complete(phase_name, step)

        def phase_finish(self, phase_name: str) -> None:
            progress.phase_finish(phase_name)

    return _Monitor()
