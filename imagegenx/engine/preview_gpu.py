"""The preview projection on the engine's device, and the copy of its pixels to the host.

The model thread only queues work here: the projection (one small matmul over the
rows that asked for a preview), its uint8 conversion and a non-blocking copy to
pinned host memory, with a CUDA event after it. Whoever reads the pixels
(the preview thread) waits for that event, so the model thread never waits for
the GPU on a preview's behalf.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from imagegenx.preview import PreviewMap


class Projection:
    """A ``PreviewMap`` as tensors on one device."""

    def __init__(self, m: PreviewMap, device: torch.device) -> None:
        self.map = m
        self.weights = torch.tensor(m.weights, dtype=torch.float32, device=device)
        self.bias = torch.tensor(m.bias, dtype=torch.float32, device=device)

    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        """(N, C, h, w) latents -> (N, h, w, 3) uint8 on the same device."""
        rgb = torch.einsum("nchw,ck->nhwk", latents.float(), self.weights).add_(self.bias)
        return rgb.clamp_(0.0, 1.0).mul_(255.0).round_().to(torch.uint8)


class PreviewFrames:
    """uint8 previews on their way to the host; ``arrays()`` waits for them."""

    def __init__(self, pixels: torch.Tensor, rows: Sequence[int]) -> None:
        self._rows = list(rows)
        if pixels.device.type == "cuda":
            host = torch.empty(pixels.shape, dtype=pixels.dtype, pin_memory=True)
            host.copy_(pixels, non_blocking=True)
            self._event: torch.cuda.Event | None = torch.cuda.Event()
            self._event.record()
            self._host = host
        else:
            self._event = None
            self._host = pixels

    def arrays(self) -> list[np.ndarray]:
        """One (rows, h, w, 3) uint8 array per state, in the order given."""
        if self._event is not None:
            self._event.synchronize()
        flat = self._host.numpy()
        out, start = [], 0
        for n in self._rows:
            out.append(flat[start:start + n])
            start += n
        return out


def project_states(projection: Projection, latents: Sequence[torch.Tensor]) -> PreviewFrames:
    """Previews of several requests' latents in one projection."""
    with torch.inference_mode():
        pixels = projection(torch.cat(list(latents)) if len(latents) > 1 else latents[0])
    return PreviewFrames(pixels, [t.shape[0] for t in latents])
