"""The UNet compiles once for every batch-size bucket (imagegenx/engine/upsample.py).

Counted with a Dynamo backend that records each compiled graph instead of
running Inductor, so the check is fast on the CPU: what decides the number of
compiles is Dynamo's guards, not the backend. Image buckets 16 and 32 are the
row buckets 16, 32 and 64, both sides of diffusers' ``shape[0] >= 64`` branch.
"""
from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any
from pathlib import Path

import pytest
import torch
from torch._dynamo.testing import CompileCounter

from imagegenx.engine import fastpath, upsample
from imagegenx.engine.fastpath import BucketedCFGUNet, FastPathOptions, unet_row_buckets

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


def test_one_row_runs_padded_in_the_two_row_graph(tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Image bucket 1 would bring a 1-row bucket (one image outside its guidance
    interval), and a batch of 1 compiles the UNet a second time (BENCHMARKS 11d).
    There is no 1-row bucket: one row runs padded to two, in the one graph."""
    monkeypatch.setattr(sys.modules[__name__], "BUCKETS", (1, 2))
    bucketed, counter = _bucketed_unet(tiny_model, monkeypatch)
    x = torch.randn(1, *bucketed.sample_shape)
    cond = torch.randn(1, *bucketed.context_shape)
    t = torch.full((1,), 500.0)
    with torch.inference_mode():
        bucketed.prepare()
        _, got = bucketed(x, t, cond, cond, guided=[])  # one unguided row
        want = _eager_unet(tiny_model)(x, t, encoder_hidden_states=cond, return_dict=False)[0]
    assert sorted(bucketed.slots) == [2, 4] == list(unet_row_buckets(BUCKETS))
    assert counter.frame_count == 1
    torch.testing.assert_close(got, want.float())  # the padding row does not touch the real one


def test_a_one_row_bucket_would_compile_twice(tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The control: with a 1-row bucket Dynamo specialises the batch of 1."""
    monkeypatch.setattr(sys.modules[__name__], "BUCKETS", (1, 2))
    monkeypatch.setattr(fastpath, "unet_row_buckets", lambda buckets: (1, 2, 4))
    bucketed, counter = _bucketed_unet(tiny_model, monkeypatch)
    with torch.inference_mode():
        bucketed.prepare()
    assert sorted(bucketed.slots) == [1, 2, 4]
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


def _with_precompiled(tiny_model: Path, monkeypatch: pytest.MonkeyPatch,
                      precompiled: Callable[..., torch.Tensor]) -> tuple[BucketedCFGUNet, CompileCounter]:
    torch._dynamo.reset()
    counter = CompileCounter()
    monkeypatch.setattr(fastpath, "COMPILE_BACKEND", counter)
    unet = _eager_unet(tiny_model)
    size = unet.config.sample_size
    bucketed = BucketedCFGUNet(unet, dtype=torch.float32, device=torch.device("cpu"),
                               sample_shape=(unet.config.in_channels, size, size),
                               context_shape=(8, unet.config.cross_attention_dim),
                               options=FastPathOptions(compile=True, cuda_graphs=False, buckets=(1, 2),
                                                       allow_cpu=True),
                               precompiled=precompiled)
    return bucketed, counter


def test_a_precompiled_call_replaces_the_compile(tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With a precompiled UNet call (a compile-cache artifact) nothing is traced at warm-up,
    and the slots' inputs are left unmarked (its graph is dynamic in the batch already)."""
    calls: list[tuple[int, bool]] = []

    def precompiled(x: torch.Tensor, t: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        marked = any(hasattr(x, name) for name in ("_dynamo_weak_dynamic_indices", "_dynamo_dynamic_indices"))
        calls.append((x.shape[0], marked))
        return bucketed.unet(x, t, encoder_hidden_states=ctx, return_dict=False)[0]

    bucketed, counter = _with_precompiled(tiny_model, monkeypatch, precompiled)
    with torch.inference_mode():
        bucketed.prepare()
    assert bucketed.precompiled and counter.frame_count == 0
    assert sorted({rows for rows, _ in calls}) == [2, 4] and not any(marked for _, marked in calls)


def test_a_precompiled_call_that_fails_falls_back_to_compiling(
        tiny_model: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    def refused(x: torch.Tensor, t: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("GuardManager check failed, reason: a guard")

    bucketed, counter = _with_precompiled(tiny_model, monkeypatch, refused)
    with caplog.at_level("WARNING", logger="imagegenx.engine.fastpath"), torch.inference_mode():
        bucketed.prepare()
    assert not bucketed.precompiled and counter.frame_count == 1 and sorted(bucketed.slots) == [2, 4]
    assert "precompiled UNet failed on 4 rows" in caplog.text and "compiling it instead" in caplog.text


def test_slots_built_before_the_precompiled_call_fails_are_rebuilt_compiled(
        tiny_model: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Buckets are prepared largest first; when a smaller one refuses the precompiled call,
    the larger ones already built on it are rebuilt, so no slot is left on either."""
    def only_large(x: torch.Tensor, t: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        if x.shape[0] < 4:
            raise AssertionError("expected size 2==4")  # e.g. Inductor's assert_size_stride
        return bucketed.unet(x, t, encoder_hidden_states=ctx, return_dict=False)[0]

    bucketed, counter = _with_precompiled(tiny_model, monkeypatch, only_large)
    with caplog.at_level("WARNING", logger="imagegenx.engine.fastpath"), torch.inference_mode():
        bucketed.prepare()
    assert not bucketed.precompiled and sorted(bucketed.slots) == [2, 4]
    assert all(slot._fn is bucketed.fn for slot in bucketed.slots.values())
    assert "precompiled UNet failed on 2 rows (AssertionError: expected size 2==4)" in caplog.text


def test_out_of_memory_in_the_precompiled_call_is_not_taken_for_a_bad_file(
        tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Running out of memory says nothing about the file: it is raised, not compiled around."""
    def oom(x: torch.Tensor, t: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    bucketed, counter = _with_precompiled(tiny_model, monkeypatch, oom)
    with pytest.raises(torch.OutOfMemoryError), torch.inference_mode():
        bucketed.prepare()
    assert bucketed.precompiled and counter.frame_count == 0
