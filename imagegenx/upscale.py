"""Upscaling of finished images (``postprocess.upscale``): Lanczos, or a
super-resolution model on the engine's device.

An upscaler takes a whole finished batch in one call. The model upscaler groups
the images by (size, factor) and runs each group as stacked tensors, in chunks
that fit a pixel budget, so a batch of N images costs a few forward passes
instead of N. Nothing here imports torch or spandrel until a model is used:
the API and CPU-only workers never need them.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from PIL import Image

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

# Most output pixels one model call may produce: one 4096x4096 image or sixteen
# 1024x1024 ones. Activation memory grows with it; a larger image runs alone.
DEFAULT_MAX_PIXELS = 4096 * 4096
MODEL_SUFFIXES = (".pth", ".safetensors")
SETTING = "upscaler_model (IMAGEGENX_UPSCALER_MODEL)"
EXTRA = "pip install 'imagegenx[upscale]'"
_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


class UpscalerError(RuntimeError):
    """The configured upscaler cannot be used; the message is one line naming the setting."""


@runtime_checkable
class Upscaler(Protocol):
    # True: uses the engine's device, so call it from the thread that owns the
    # model, between batches. False: CPU only, any thread.
    runs_on_device: bool

    def upscale(self, images: Sequence[Image.Image], factors: Sequence[int]) -> list[Image.Image]:
        """Image i enlarged ``factors[i]`` times, in input order (factor 1: the same object)."""


def _check(images: Sequence[Image.Image], factors: Sequence[int]) -> None:
    if len(images) != len(factors):
        raise ValueError(f"{len(images)} images but {len(factors)} factors")
    bad = [f for f in factors if isinstance(f, bool) or not isinstance(f, int) or f < 1]
    if bad:
        raise ValueError(f"upscale factors must be positive integers, got {bad[0]!r}")


def groups(images: Sequence[Image.Image],
           factors: Sequence[int]) -> dict[tuple[tuple[int, int], int], list[int]]:
    """Indices of the images to enlarge, by ((width, height), factor), in input order."""
    _check(images, factors)
    out: dict[tuple[tuple[int, int], int], list[int]] = {}
    for i, (image, factor) in enumerate(zip(images, factors)):
        if factor != 1:
            out.setdefault((image.size, factor), []).append(i)
    return out


def lanczos(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    return image.resize(size, Image.Resampling.LANCZOS)


class LanczosUpscaler:
    """Pillow's Lanczos filter on the CPU: the default, no model needed.

    Pillow releases the GIL while resizing, so with an ``executor`` (the render
    pool) the images of a batch are resized in parallel.
    """

    runs_on_device = False

    def __init__(self, executor: Executor | None = None) -> None:
        self.executor = executor

    def upscale(self, images: Sequence[Image.Image], factors: Sequence[int]) -> list[Image.Image]:
        out = list(images)
        work = [(i, (images[i].width * f, images[i].height * f))
                for (_, f), idx in groups(images, factors).items() for i in idx]
        if self.executor is None:
            for i, size in work:
                out[i] = lanczos(images[i], size)
        else:
            futures = [(i, self.executor.submit(lanczos, images[i], size)) for i, size in work]
            for i, future in futures:
                out[i] = future.result()
        return out


class ModelUpscaler:
    """A super-resolution model run batched on ``device``.

    ``model`` maps an NCHW float tensor in [0, 1] to one ``scale`` times larger
    (a torch module, or spandrel's descriptor, which also pads for the
    architecture's size rules). A factor the model does not produce in one
    pass runs it as many times as fit in the factor (a x2 model for x4: twice;
    a x4 model for x2: once), then Lanczos makes the exact size.
    """

    runs_on_device = True

    def __init__(self, model: Callable[[torch.Tensor], torch.Tensor], scale: int,
                 device: torch.device | str, dtype: torch.dtype, *,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        import torch

        if scale < 2:
            raise ValueError(f"a super-resolution model enlarges; scale {scale} does not")
        if max_pixels < 1:
            raise ValueError("max_pixels must be positive")
        self.model = model
        self.scale = scale
        self.device = torch.device(device)
        self.dtype = dtype
        self.max_pixels = max_pixels

    def passes(self, factor: int) -> int:
        """Model runs for ``factor``: as many as fit in it, at least one."""
        n = 1
        while self.scale ** (n + 1) <= factor:
            n += 1
        return n

    def upscale(self, images: Sequence[Image.Image], factors: Sequence[int]) -> list[Image.Image]:
        out = list(images)
        for ((w, h), factor), idx in groups(images, factors).items():
            passes = self.passes(factor)
            reach = self.scale ** passes
            per_call = max(1, self.max_pixels // (w * h * reach * reach))
            target = (w * factor, h * factor)
            for start in range(0, len(idx), per_call):
                chunk = idx[start:start + per_call]
                for i, image in zip(chunk, self._run([images[i] for i in chunk], passes)):
                    out[i] = image if image.size == target else lanczos(image, target)
        return out

    def _run(self, images: list[Image.Image], passes: int) -> list[Image.Image]:
        """One stacked tensor through the model ``passes`` times; uint8 leaves the device."""
        import numpy as np
        import torch

        pixels = np.stack([np.asarray(im.convert("RGB")) for im in images])
        n, h, w, _ = pixels.shape
        with torch.inference_mode():
            x = torch.from_numpy(pixels).to(self.device).permute(0, 3, 1, 2)
            x = x.to(self.dtype).contiguous().div_(255.0)  # NCHW-contiguous: some models view()
            for _ in range(passes):
                y = self.model(x)
                h, w = h * self.scale, w * self.scale
                if not isinstance(y, torch.Tensor) or tuple(y.shape) != (n, 3, h, w):
                    shape = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
                    raise RuntimeError(f"upscaler model returned {shape} for input "
                                       f"{tuple(x.shape)}; expected {(n, 3, h, w)}")
                x = y.to(self.dtype).nan_to_num_(0.0).clamp_(0.0, 1.0)
            x = x.float().mul_(255.0).round_().to(torch.uint8).permute(0, 2, 3, 1).contiguous()
            if self.device.type == "cuda":
                # Into pinned host memory: tens of times faster than a pageable copy.
                host = x.to("cpu", non_blocking=True)
                torch.cuda.current_stream(self.device).synchronize()
            else:
                host = x.cpu()
            arrays = host.numpy()
        return [Image.fromarray(a, "RGB") for a in arrays]


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _resolve(device: Any, dtype: Any) -> tuple[torch.device, torch.dtype]:
    """Settings' names ('auto', 'cuda', 'fp16', ...) or torch objects; 'auto' as
    for the engine: the GPU in fp16 when there is one, else the CPU in fp32."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if dtype == "auto":
        dtype = "fp16" if device.type == "cuda" else "fp32"
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise UpscalerError(f"unknown dtype {dtype!r}; expected auto, fp32, fp16 or bf16")
        dtype = getattr(torch, _DTYPES[dtype])
    return device, dtype


def load_upscaler(path: str | Path, device: Any = "auto", dtype: Any = "auto", *,
                  max_pixels: int = DEFAULT_MAX_PIXELS,
                  executor: Executor | None = None) -> Upscaler:
    """The upscaler the ``upscaler_model`` setting names.

    Empty: Lanczos (``executor`` parallelises it). Else the super-resolution
    weights in that file, loaded with spandrel onto ``device`` in ``dtype``
    (fp32 where the architecture supports no half precision). Raises
    UpscalerError with one line saying what is wrong.
    """
    if not str(path):
        return LanczosUpscaler(executor)
    path = Path(path)
    where = f"{SETTING} {str(path)!r}"
    if path.suffix.lower() not in MODEL_SUFFIXES:
        raise UpscalerError(f"{where}: expected a .pth or .safetensors weights file")
    if not path.is_file():
        raise UpscalerError(f"{where}: no such file")
    try:
        import spandrel
    except Exception as exc:  # not installed, or torchvision broken (RuntimeError)
        raise UpscalerError(f"{where} needs spandrel, which cannot be imported "
                            f"({_one_line(exc)}); install the upscale extra: {EXTRA}") from exc
    dev, dt = _resolve(device, dtype)
    try:
        descriptor = spandrel.ModelLoader(device=dev).load_from_file(path)
    except spandrel.UnsupportedModelError:
        raise UpscalerError(f"{where}: unsupported architecture (spandrel recognises "
                            "no model in these weights)") from None
    except Exception as exc:
        raise UpscalerError(f"{where}: cannot be loaded ({_one_line(exc)})") from exc
    if not isinstance(descriptor, spandrel.ImageModelDescriptor):
        raise UpscalerError(f"{where}: a {descriptor.purpose} model, not super-resolution")
    if descriptor.scale < 2:
        raise UpscalerError(f"{where}: a x{descriptor.scale} {descriptor.purpose} model, "
                            "not super-resolution")
    if descriptor.input_channels != 3 or descriptor.output_channels != 3:
        raise UpscalerError(f"{where}: {descriptor.input_channels} input and "
                            f"{descriptor.output_channels} output channels; RGB needs 3 and 3")
    import torch

    if (dt == torch.float16 and not descriptor.supports_half) or (
            dt == torch.bfloat16 and not descriptor.supports_bfloat16):
        log.warning("upscaler %s (%s) does not support %s: it runs in fp32",
                    path.name, descriptor.architecture.name, dt)
        dt = torch.float32
    descriptor.to(dev, dt).eval()
    descriptor.model.requires_grad_(False)
    log.info("upscaler %s: %s x%d on %s, %s", path.name, descriptor.architecture.name,
             descriptor.scale, dev, dt)
    return ModelUpscaler(descriptor, descriptor.scale, dev, dt, max_pixels=max_pixels)
