"""Previews of running requests: the cheap latent-to-RGB projection and its PNG.

A preview is ``rgb = latents . weights + bias`` per latent pixel (a C x 3 linear
map plus a bias, fitted by least squares on the model's own VAE: see
``imagegenx.engine.preview_fit``), so it costs one tiny matmul on the GPU instead
of a VAE decode. The map of a model lives next to it as ``preview.json``.

When a preview is taken (the rule the worker follows, also in docs/API.md):
a request with ``preview.every = K`` is *due* a preview once its step count has
reached a multiple of K above its last preview's. A due preview is taken at the
first step at which the request's progress is stored (at most once per
``progress_interval_s``), of the latents at that step, so previews are coalesced,
never lost: a due preview waits for the next progress store instead of being
dropped, and the preview's ``step`` says which step it shows. No preview is
taken at the last step (the result follows at once).

Nothing here imports torch: the worker's threads and the tests use it as is.
"""
from __future__ import annotations

import base64
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

FILE_NAME = "preview.json"
# The shortest side a preview PNG is enlarged to (a 64x64 model's latents are 16x16).
MIN_SIDE = 64


@dataclass(frozen=True)
class PreviewMap:
    """rgb in [0, 1] = latent (C channels, scaled as the UNet sees them) . weights + bias."""

    weights: tuple[tuple[float, float, float], ...]  # C rows of (r, g, b)
    bias: tuple[float, float, float]
    info: dict[str, Any] | None = None  # how it was fitted, and its measured error

    @property
    def channels(self) -> int:
        return len(self.weights)

    def project(self, latents: np.ndarray) -> np.ndarray:
        """(N, C, h, w) latents -> (N, h, w, 3) uint8 (the reference the GPU path matches)."""
        rgb = np.einsum("nchw,ck->nhwk", latents.astype(np.float32), np.asarray(self.weights, np.float32))
        rgb += np.asarray(self.bias, np.float32)
        return (np.clip(rgb, 0.0, 1.0) * 255.0).round().astype(np.uint8)

    def to_json(self) -> dict[str, Any]:
        return {"weights": [list(r) for r in self.weights], "bias": list(self.bias), **({"fit": self.info}
                                                                                      if self.info else {})}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "PreviewMap":
        weights = tuple(tuple(float(v) for v in row) for row in data["weights"])
        bias = tuple(float(v) for v in data["bias"])
        if not weights or any(len(r) != 3 for r in weights) or len(bias) != 3:
            raise ValueError("a preview map needs C rows of 3 weights and 3 biases")
        return cls(weights, bias, data.get("fit"))  # type: ignore[arg-type]

    @classmethod
    def load(cls, path: Path) -> "PreviewMap":
        return cls.from_json(json.loads(Path(path).read_text()))

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=2) + "\n")


@dataclass(frozen=True)
class ReadyFrames:
    """Previews already on the host (CPU engines): one (rows, h, w, 3) uint8 array per request."""

    frames: list[np.ndarray]

    def arrays(self) -> list[np.ndarray]:
        return self.frames


def map_file(model_dir: Path) -> Path:
    return Path(model_dir) / FILE_NAME


def preview_due(index: int, every: int, last: int) -> bool:
    """A multiple of ``every`` was reached since the last preview (taken at step ``last``)."""
    return index // every > last // every


def strip(images: np.ndarray) -> np.ndarray:
    """A request's (n, h, w, 3) previews side by side: one (h, n*w, 3) picture."""
    return np.concatenate(list(images), axis=1) if len(images) > 1 else images[0]


def encode(images: np.ndarray, step: int) -> dict[str, Any]:
    """The preview of one request as the progress data carries it:
    {step, width, height, png_base64}; enlarged (nearest) to at least MIN_SIDE."""
    picture = Image.fromarray(strip(images), "RGB")
    factor = max(1, -(-MIN_SIDE // min(picture.size)))
    if factor > 1:
        picture = picture.resize((picture.width * factor, picture.height * factor), Image.NEAREST)
    buf = io.BytesIO()
    picture.save(buf, format="PNG", compress_level=1)  # speed over bytes: it is small anyway
    return {"step": step, "width": picture.width, "height": picture.height,
            "png_base64": base64.b64encode(buf.getvalue()).decode("ascii")}
