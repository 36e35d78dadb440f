"""The precompiled UNet call (imagegenx/engine/precompile.py): saved, loaded after
Dynamo forgot everything, and run at other batch sizes without tracing again.

A small stand-in with the UNet's call signature keeps the real Inductor compile
to seconds on the CPU; the SD1.5 UNet's figures are bench/precompile_unet.py's.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from imagegenx.engine import precompile


class StandIn(torch.nn.Module):
    """``forward(x, t, encoder_hidden_states=, return_dict=)`` like diffusers' UNet."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 4, 3, padding=1)
        self.proj = torch.nn.Linear(8, 4)

    def forward(self, x: torch.Tensor, t: torch.Tensor, encoder_hidden_states: torch.Tensor,
                return_dict: bool = True) -> tuple[torch.Tensor]:
        cond = self.proj(encoder_hidden_states).mean(1)[:, :, None, None]
        return (self.conv(x) * (t[:, None, None, None] / 1000) + cond,)


def _inputs(rows: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(rows)
    return (torch.randn(rows, 4, 8, 8, generator=gen, dtype=dtype), torch.full((rows,), 500.0),
            torch.randn(rows, 3, 8, generator=gen, dtype=dtype))


@pytest.mark.skipif(not precompile.supported(), reason="this torch cannot precompile (no aot_compile)")
def test_saved_call_loads_without_tracing_and_matches_eager(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from torch._dynamo.utils import counters

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    model = StandIn().eval()
    with torch.inference_mode():
        compiled = precompile.compile_unet_call(model, *_inputs(4))
        compiled.save_compiled_function(str(tmp_path / "unet.precompiled"))
        torch._dynamo.reset()
        counters.clear()
    call = precompile.load_unet_call(tmp_path / "unet.precompiled", model)
    with torch.inference_mode():
        for rows in (2, 3, 8):  # one graph, dynamic in the batch (the CPU convolution bounds it by 15)
            x, t, ctx = _inputs(rows)
            torch.testing.assert_close(call(x, t, ctx), precompile.unet_call(model, x, t, ctx),
                                       rtol=1e-5, atol=1e-5)
        assert counters["stats"]["unique_graphs"] == 0  # nothing traced after the load
        with pytest.raises(RuntimeError, match="[Gg]uard"):  # kept guards: dtype
            call(*_inputs(2, torch.float64))


def test_guard_filter_keeps_only_portable_guards() -> None:
    class Entry:
        def __init__(self, guard_type: str, is_global: bool = False) -> None:
            self.guard_type, self.is_global = guard_type, is_global

    entries = [Entry("TENSOR_MATCH"), Entry("TENSOR_MATCH", is_global=True), Entry("ID_MATCH"),
               Entry("SHAPE_ENV"), Entry("GLOBAL_STATE"), Entry("TYPE_MATCH")]
    assert precompile.portable_guards(entries) == [True, False, False, True, False, False]


def test_code_id_is_stable_and_names_the_traced_code() -> None:
    assert precompile.code_id() == precompile.code_id() and len(precompile.code_id()) == 16


@pytest.mark.skipif(not precompile.supported(), reason="this torch cannot precompile (no aot_compile)")
def test_the_compile_cache_artifact_carries_the_precompiled_call(
        tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """``optimize warmup``'s save writes it beside the cache; a worker's load hands it to the engine,
    and a damaged one leaves the engine tracing (logged), the cache still loaded."""
    import logging
    from types import SimpleNamespace

    from imagegenx import compile_cache
    from imagegenx.compile_manifest import MANIFEST_FILE, PRECOMPILED_UNET_FILE
    from imagegenx.engine.fastpath import FastPathOptions
    from imagegenx.settings import Settings

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor-a"))
    torch._dynamo.reset()
    model = StandIn().eval()
    bucketed = SimpleNamespace(unet=model, sample_shape=(4, 8, 8), context_shape=(3, 8),
                               device=torch.device("cpu"), dtype=torch.float32)

    def engine(**extra: object) -> SimpleNamespace:
        return SimpleNamespace(fast_options=FastPathOptions(buckets=(1, 2)), device=torch.device("cpu"),
                               dtype=torch.float32, unet=model, precompiled_unet=None, **extra)

    settings = Settings(model=tiny_model)
    art = tmp_path / "art"
    manifest = compile_cache.save_compile_cache(str(art), compile_cache.engine_manifest(settings, engine()),
                                                settings, engine=engine(fast=SimpleNamespace(unet=bucketed)))
    assert manifest.precompiled_unet == PRECOMPILED_UNET_FILE
    assert manifest.precompiled_unet_bytes == (art / PRECOMPILED_UNET_FILE).stat().st_size > 0

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor-b"))
    torch._dynamo.reset()
    worker = engine()
    assert compile_cache.load_compile_cache(str(art), manifest, settings, engine=worker) is None
    with torch.inference_mode():
        x, t, ctx = _inputs(3)
        torch.testing.assert_close(worker.precompiled_unet(x, t, ctx), precompile.unet_call(model, x, t, ctx),
                                   rtol=1e-5, atol=1e-5)

    # Built from other code (another diffusers, or this project's UNet changes): not loaded.
    manifest_file = art / MANIFEST_FILE
    saved = manifest_file.read_text()
    assert manifest.precompiled_unet_code == precompile.code_id()
    manifest_file.write_text(saved.replace(manifest.precompiled_unet_code, "0" * 16))
    other = engine()
    with caplog.at_level(logging.WARNING, logger="imagegenx.compile_cache"):
        assert compile_cache.load_compile_cache(str(art), manifest, settings, engine=other) is None
    assert other.precompiled_unet is None and "built from other code: 0000000000000000" in caplog.text
    manifest_file.write_text(saved)
    caplog.clear()

    # Cut short (a copy that stopped part way): not loaded, with both sizes.
    whole = (art / PRECOMPILED_UNET_FILE).read_bytes()
    (art / PRECOMPILED_UNET_FILE).write_bytes(whole[: len(whole) // 2])
    short = engine()
    with caplog.at_level(logging.WARNING, logger="imagegenx.compile_cache"):
        assert compile_cache.load_compile_cache(str(art), manifest, settings, engine=short) is None
    assert short.precompiled_unet is None
    assert f"ValueError: {len(whole) // 2} bytes, the manifest says {len(whole)}" in caplog.text
    caplog.clear()

    (art / PRECOMPILED_UNET_FILE).write_bytes(b"\x00" * len(whole))  # whole, but not a compiled function
    damaged = engine()
    with caplog.at_level(logging.WARNING, logger="imagegenx.compile_cache"):
        assert compile_cache.load_compile_cache(str(art), manifest, settings, engine=damaged) is None
    assert damaged.precompiled_unet is None
    assert "precompiled UNet" in caplog.text and "tracing it" in caplog.text
    assert "built from other code" not in caplog.text and "the manifest says" not in caplog.text
