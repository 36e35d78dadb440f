"""The fast path's UNet call, precompiled: traced, guarded and compiled once, saved,
and loaded by a fresh worker without running Dynamo again.

A worker with the portable compile cache (``imagegenx.compile_cache``) skips
code generation but still traces the UNet in Python at start. PyTorch's
precompile (``torch.compile(...).aot_compile``) stores the traced graph, its
guards and the compiled code together. The UNet is not stored: it is an
argument of :func:`unet_call`, so its weights stay where the engine loaded them
and the saved graph reads them as inputs.

Guards kept: tensor metadata (shapes, strides, dtypes, devices, dispatch keys,
the dynamic batch's range) and the shape environment. Guards on module identity
cannot be saved; what they protected is what the artifact's manifest checks
before anything is loaded (the same model and options) and :func:`code_id` (the
same traced code). Global state is not kept: its guard includes the CPU thread
count, which differs between machines; the worker runs the UNet under the same
settings (inference mode, fp16, TF32 off) as the build, from the same code.
"""
from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import torch

UNetCall = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class PrecompileUnavailable(RuntimeError):
    """This torch cannot precompile (no ``aot_compile``); the caller compiles as before."""


def unet_call(unet: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
    """The UNet's noise prediction, as the fast path calls it."""
    return unet(x, t, encoder_hidden_states=ctx, return_dict=False)[0]


def portable_guards(entries: Sequence[Any]) -> list[bool]:
    """Which of Dynamo's guards to keep: those that can be saved and still mean something."""
    return [g.guard_type == "SHAPE_ENV" or (g.guard_type == "TENSOR_MATCH" and not g.is_global)
            for g in entries]


def code_id() -> str:
    """What the saved graph was traced from: torch and diffusers versions and the source of
    the modules that shape the UNet's forward here. A precompiled file from other code is
    not loaded (its module guards, which would have noticed, are not saved)."""
    import hashlib
    import inspect

    import diffusers

    from imagegenx.engine import fastpath, upsample

    digest = hashlib.sha256(f"{torch.__version__}|{diffusers.__version__}".encode())
    for module in (fastpath, upsample, sys.modules[__name__]):
        digest.update(inspect.getsource(module).encode())
    return digest.hexdigest()[:16]


def _aot_compile_enabled() -> contextlib.AbstractContextManager[Any]:
    """Before torch 2.12, ``torch.compile`` gives ``aot_compile`` only with this switch on."""
    dynamo_config = torch._dynamo.config
    if hasattr(dynamo_config, "enable_aot_compile"):
        return dynamo_config.patch(enable_aot_compile=True)
    return contextlib.nullcontext()


def supported() -> bool:
    """Whether this torch can precompile (has ``aot_compile`` and ``load_compiled_function``)."""
    with _aot_compile_enabled():
        compiled = torch.compile(unet_call, fullgraph=True)
    return hasattr(compiled, "aot_compile") and hasattr(torch.compiler, "load_compiled_function")


def compile_unet_call(unet: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, ctx: torch.Tensor) -> Any:
    """Precompile :func:`unet_call` for ``unet`` with a dynamic batch (at least 2 rows).

    Returns PyTorch's compiled function (``save_compiled_function(path)`` writes it).
    """
    import torch._inductor.config as inductor_config

    inductor_config.conv_1x1_as_mm = True
    with _aot_compile_enabled():
        compiled = torch.compile(unet_call, fullgraph=True, dynamic=None,
                                 options={"guard_filter_fn": portable_guards})
        if not hasattr(compiled, "aot_compile"):
            raise PrecompileUnavailable(f"torch {torch.__version__} has no aot_compile")
        for tensor in (x, t, ctx):
            torch._dynamo.maybe_mark_dynamic(tensor, 0)
        return compiled.aot_compile(((unet, x, t, ctx), {}))


def load_unet_call(source: Path | BinaryIO, unet: torch.nn.Module) -> UNetCall:
    """Load a precompiled :func:`unet_call` (a file, or its bytes as a stream) and bind it to ``unet``."""
    load = getattr(torch.compiler, "load_compiled_function", None)
    if load is None:
        raise PrecompileUnavailable(f"torch {torch.__version__} has no load_compiled_function")
    # Loaded as it is called, in inference mode: the guards' expected dispatch keys are
    # taken relative to the mode in force when they are rebuilt here.
    with torch.inference_mode():
        if isinstance(source, Path):
            with open(source, "rb") as f:
                compiled = load(f)
        else:
            compiled = load(source)

    def call(x: torch.Tensor, t: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        return compiled(unet, x, t, ctx)

    return call
