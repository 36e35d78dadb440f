"""The UNet compiles once for every batch-size bucket (imagegenx/engine/upsample.py).

Counted with a Dynamo backend that records each compiled graph instead of
running Inductor, so the check is fast on the CPU: what decides the number of
compiles is Dynamo's guards, not the backend. Image buckets 16 and 32 are the
row buckets 16, 32 and 64, both sides of diffusers' ``shape[0] >= 64`` branch.
"""
from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Callable, Iterator
from typing import Any
from pathlib import Path

import pytest
import torch
from torch._dynamo.testing import CompileCounter

from imagegenx.engine import fastpath, upsample
from imagegenx.engine.fastpath import BucketedCFGUNet, FastPathOptions, unet_row_buckets
from imagegenx.errors import caused_by_out_of_memory

BUCKETS = (16, 32)


def _eager_unet(tiny_model: Path) -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(tiny_model, subfolder="unet").eval().requires_grad_(False)


def _bucketed_unet(tiny_model: Path, monkeypatch: pytest.MonkeyPatch,
                   backend: Callable[[CompileCounter], Any] | None = None) -> tuple[BucketedCFGUNet, CompileCounter]:
    """The bucketed UNet compiled with a counting backend (or ``backend(counter)``)."""
    torch._dynamo.reset()
    counter = CompileCounter()
    monkeypatch.setattr(fastpath, "COMPILE_BACKEND", counter if backend is None else backend(counter))
    unet = _eager_unet(tiny_model)
    size = unet.config.sample_size
    bucketed = BucketedCFGUNet(unet, dtype=torch.float32, device=torch.device("cpu"),
                               sample_shape=(unet.config.in_channels, size, size),
                               context_shape=(8, unet.config.cross_attention_dim),
                               options=FastPathOptions(compile=True, cuda_graphs=False, buckets=BUCKETS,
                                                       allow_cpu=True))
    return bucketed, counter


def test_unet_compiles_once_for_all_buckets(tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bucketed, counter = _bucketed_unet(tiny_model, monkeypatch)
    with torch.inference_mode():
        bucketed.prepare()
    assert sorted(bucketed.slots) == [16, 32, 64] == list(unet_row_buckets(BUCKETS))  # UNet rows
    assert counter.frame_count == 1


def test_the_one_row_bucket_compiles_nothing_more(tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Image bucket 1 brings a 1-row bucket (one image outside its guidance interval).
    Dynamo specialises a batch of 1, which compiled the UNet a second time on the GPU
    (and traced it again from a compiled artifact); the fast path traces the batch
    size-obliviously. This counts Dynamo's graphs; guards a compiler backend adds
    (the CPU's oneDNN convolution picks by batch size) are not seen here."""
    monkeypatch.setattr(sys.modules[__name__], "BUCKETS", (1, 2))
    bucketed, counter = _bucketed_unet(tiny_model, monkeypatch)
    with torch.inference_mode():
        bucketed.prepare()
        x = torch.randn(1, *bucketed.sample_shape)
        ctx = torch.randn(1, *bucketed.context_shape)
        t = torch.full((1,), 500.0)
        got = bucketed.slots[1].run(x, t, ctx)
        want = _eager_unet(tiny_model)(x, t, encoder_hidden_states=ctx, return_dict=False)[0]
    assert sorted(bucketed.slots) == [1, 2, 4]
    assert counter.frame_count == 1
    torch.testing.assert_close(got, want.float())  # the shared graph at one row is the UNet


def test_a_batch_of_one_compiles_twice_without_size_oblivious_tracing(
        tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The control: plain ``torch.compile`` specialises the 1-row bucket."""
    monkeypatch.setattr(sys.modules[__name__], "BUCKETS", (1, 2))
    monkeypatch.setattr(fastpath, "_size_oblivious", contextlib.nullcontext)
    bucketed, counter = _bucketed_unet(tiny_model, monkeypatch)
    with torch.inference_mode():
        bucketed.prepare()
    assert counter.frame_count == 2


def test_without_the_fix_it_compiles_twice(tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The control: diffusers' own forward splits the graph at 64 rows."""
    monkeypatch.setattr(fastpath, "single_branch_upsamplers", lambda model: 0)
    bucketed, counter = _bucketed_unet(tiny_model, monkeypatch)
    with torch.inference_mode():
        bucketed.prepare()
    assert counter.frame_count == 2


def test_branch_free_forward_matches_diffusers_eagerly() -> None:
    from diffusers.models.upsampling import Upsample2D

    torch.manual_seed(0)
    original = Upsample2D(8, use_conv=True).eval()
    patched = Upsample2D(8, use_conv=True).eval()
    patched.load_state_dict(original.state_dict())
    assert upsample.single_branch_upsamplers(patched) == 1
    assert upsample.single_branch_upsamplers(patched) == 0  # once only
    for rows in (2, 64):
        x = torch.randn(rows, 8, 4, 4).to(memory_format=torch.channels_last)
        torch.testing.assert_close(patched(x), original(x), rtol=0, atol=0)
        torch.testing.assert_close(patched(x, output_size=(7, 9)), original(x, output_size=(7, 9)),
                                   rtol=0, atol=0)


def test_upsamplers_with_a_norm_keep_diffusers_forward() -> None:
    from diffusers.models.upsampling import Upsample2D

    assert upsample.single_branch_upsamplers(Upsample2D(8, use_conv=True, norm_type="ln_norm", eps=1e-5,
                                                        elementwise_affine=True)) == 0
    assert upsample.single_branch_upsamplers(Upsample2D(8, use_conv_transpose=True)) == 0


def test_a_failed_size_oblivious_compile_falls_back_to_plain_compile(
        tiny_model: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """The setting is experimental in PyTorch: a compile that fails under it costs the
    old second graph, not the worker's start. The failure is raised by the backend,
    inside ``torch.compile``, while the setting is on."""
    monkeypatch.setattr(sys.modules[__name__], "BUCKETS", (1, 2))
    setting_on = [False]

    @contextlib.contextmanager
    def marked() -> Iterator[None]:
        setting_on[0] = True
        try:
            yield
        finally:
            setting_on[0] = False

    def failing_under_the_setting(counter: CompileCounter) -> Callable[..., Any]:
        def backend(gm: torch.fx.GraphModule, inputs: list[torch.Tensor]) -> Callable[..., Any]:
            if setting_on[0]:
                raise RuntimeError("a size-oblivious trace this backend cannot compile")
            return counter(gm, inputs)
        return backend

    monkeypatch.setattr(fastpath, "_size_oblivious", marked)
    bucketed, counter = _bucketed_unet(tiny_model, monkeypatch, failing_under_the_setting)
    with caplog.at_level(logging.WARNING, logger="imagegenx.engine.fastpath"), torch.inference_mode():
        bucketed.prepare()
    assert sorted(bucketed.slots) == [1, 2, 4]
    assert counter.frame_count == 2  # compiled without the setting: the batch of 1 apart
    assert "size-oblivious batch tracing failed" in caplog.text
    assert "a size-oblivious trace this backend cannot compile" in caplog.text  # with its traceback


def test_an_out_of_memory_error_is_not_taken_for_a_tracing_failure() -> None:
    """Compiling may run out of memory (autotuning); that goes to the OOM split, not the fallback."""
    from torch._dynamo.exc import TorchRuntimeError

    try:
        try:
            raise torch.OutOfMemoryError("CUDA out of memory")
        except torch.OutOfMemoryError as oom:
            raise TorchRuntimeError("compiling failed") from oom
    except TorchRuntimeError as exc:
        assert caused_by_out_of_memory(exc)
    assert not caused_by_out_of_memory(TorchRuntimeError("a shape it cannot trace"))
