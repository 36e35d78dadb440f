"""VAE decodes on a CUDA stream of their own, overlapped with the next UNet calls.

Under the step scheduler a request leaves the running set when its own steps
are done, and its rows are decoded while the others go on. Decoded on the
UNet's stream, with the host waiting for the pixels, every decode holds up
every running request: the host cannot queue the next UNet call until the
decode and all calls queued before it have ended. A UNet call of a few rows
does not fill the GPU, so the decode is queued on a second stream instead
(after the step that finished the latents), its pixels are copied into pinned
host memory without waiting, and the step loop collects them once the
stream's event has passed (:class:`StreamDecode`).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from PIL import Image

NOT_FINITE = "the latents are not finite (NaN or infinity): the model diverged"


class StreamDecode:
    """One batched decode queued on the decode stream (``PendingDecode``)."""

    def __init__(self, rows: Sequence[int], pixels: torch.Tensor, finite: torch.Tensor,
                 done: Any, keep: tuple[Any, ...]) -> None:
        self._rows = list(rows)
        self._pixels = pixels  # uint8 NHWC, pinned host memory, written by the device
        self._finite = finite  # bool per row, pinned host memory
        self._done = done  # the decode stream's event after both copies
        self._keep: tuple[Any, ...] | None = keep  # device tensors the stream reads, alive until it has
        self._images: list[list[Image.Image] | Exception] | None = None

    def ready(self) -> bool:
        return self._images is not None or bool(self._done.query())

    def result(self) -> list[list[Image.Image] | Exception]:
        if self._images is None:
            self._done.synchronize()
            self._keep = None
            finite = self._finite.tolist()
            # A copy: the pinned buffer goes back to the host allocator's cache.
            arrays = self._pixels.numpy().copy()
            self._pixels = self._finite = None  # type: ignore[assignment]
            out: list[list[Image.Image] | Exception] = []
            start = 0
            for n in self._rows:
                if all(finite[start:start + n]):
                    out.append([Image.fromarray(a) for a in arrays[start:start + n]])
                else:
                    out.append(ValueError(NOT_FINITE))
                start += n
            self._images = out
        return self._images


def decode_on_stream(latents: Sequence[torch.Tensor], decode: Callable[[torch.Tensor], torch.Tensor],
                     stream: torch.cuda.Stream) -> StreamDecode:
    """Queue ``decode`` (latents to uint8 NHWC pixels) of every state's ``latents``
    together on ``stream``, after the work queued so far on the current stream."""
    main = torch.cuda.current_stream(stream.device)
    stream.wait_stream(main)
    with torch.inference_mode(), torch.cuda.stream(stream):
        batch = torch.cat(list(latents))
        finite_dev = torch.isfinite(batch).flatten(1).all(1)
        pixels_dev = decode(batch)
        pixels = torch.empty(pixels_dev.shape, dtype=pixels_dev.dtype, pin_memory=True)
        finite = torch.empty(finite_dev.shape, dtype=finite_dev.dtype, pin_memory=True)
        pixels.copy_(pixels_dev, non_blocking=True)
        finite.copy_(finite_dev, non_blocking=True)
        done = torch.cuda.Event()
        done.record(stream)
    # The inputs were made on the UNet's stream: kept alive until the decode has read
    # them, so their memory is not handed to a later UNet call meanwhile.
    return StreamDecode([t.shape[0] for t in latents], pixels, finite, done,
                        keep=(tuple(latents), batch, pixels_dev, finite_dev))
