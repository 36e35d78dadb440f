"""One compiled graph for every batch size: a branch-free ``Upsample2D`` forward.

diffusers' ``Upsample2D.forward`` makes its input contiguous when the batch has
64 rows or more (an old eager ``upsample_nearest_nhwc`` limit). Under
``torch.compile`` with a dynamic batch, that ``if`` becomes a guard on the batch
size, so the UNet compiled at bucket 32 (64 rows under CFG) is guarded by
``rows >= 64`` and the smaller buckets compile it a second time.

:func:`single_branch_upsamplers` gives each plain upsampler (nearest
interpolation, optional convolution, no norm, no transposed convolution; what
the SD1.x/SDXL UNets use) a forward that takes the branch only when running
eagerly. Compiled code never reads the batch size there, so one graph serves
every bucket; eager calls behave as before. Inductor writes its own upsample
kernel, to which the eager limit does not apply. The forward comes with a
subclass (the module's class is swapped, its weights untouched), not a
per-instance method, so a precompiled UNet's guards can be pickled.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.upsampling import Upsample2D

EAGER_CONTIGUOUS_ROWS = 64  # diffusers' threshold for its eager workaround


def _plain(module: torch.nn.Module) -> bool:
    conv = getattr(module, "conv", None) if getattr(module, "name", "conv") == "conv" else None
    return (type(module) is Upsample2D
            and getattr(module, "interpolate", False)
            and not getattr(module, "use_conv_transpose", True)
            and getattr(module, "norm", None) is None
            and getattr(module, "name", None) == "conv"
            and (not module.use_conv or isinstance(conv, torch.nn.Conv2d)))


def _forward(self: Any, hidden_states: torch.Tensor, output_size: Any = None, *args: Any,
             **kwargs: Any) -> torch.Tensor:
    if not torch.compiler.is_compiling():  # diffusers' eager workarounds (batch and output size)
        scale = 2.0 if output_size is None else max(
            f / s for f, s in zip(output_size, hidden_states.shape[-2:], strict=True))
        if hidden_states.shape[0] >= EAGER_CONTIGUOUS_ROWS or hidden_states.numel() * scale > 2 ** 31:
            hidden_states = hidden_states.contiguous()
    if output_size is None:
        hidden_states = F.interpolate(hidden_states, scale_factor=2.0, mode="nearest")
    else:
        hidden_states = F.interpolate(hidden_states, size=output_size, mode="nearest")
    if self.use_conv:
        hidden_states = self.conv(hidden_states)
    return hidden_states


class SingleBranchUpsample2D(Upsample2D):
    """diffusers' ``Upsample2D`` with :func:`_forward`; made by swapping an instance's class."""

    forward = _forward


def single_branch_upsamplers(model: torch.nn.Module) -> int:
    """Give every plain ``Upsample2D`` in ``model`` the branch-free forward; how many got it.

    Others (norms, transposed convolutions) keep diffusers' forward: with them
    the UNet may still compile twice, which costs time, not correctness.
    """
    patched = 0
    for module in model.modules():
        if _plain(module):
            module.__class__ = SingleBranchUpsample2D
            patched += 1
    return patched
