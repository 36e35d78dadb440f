"""The fast path's bucket logic, its settings, and its padded path on the CPU.

On the CPU the engine never uses the fast path by itself; ``allow_cpu`` runs the
same static buffers, padding, splitting and row dropping without compile or
CUDA graphs, so this logic is checked where CI runs. CPU fp32 kernels differ
between batch sizes only by float rounding: at most 1 uint8 level was measured.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from imagegenx.engine.base import BatchSpec, Sample
from imagegenx.engine.fastpath import FastPathOptions, bucket_for, split_rows
from imagegenx.settings import Settings

UINT8_TOL = 2


def test_bucket_for() -> None:
    buckets = (1, 2, 4, 8)
    assert [bucket_for(n, buckets) for n in (1, 2, 3, 4, 5, 8, 9)] == [1, 2, 4, 4, 8, 8, None]


def test_split_rows_pads_or_splits() -> None:
    assert split_rows(3, (1, 2, 4)) == [(0, 3, 4)]
    assert split_rows(4, (1, 2, 4)) == [(0, 4, 4)]
    assert split_rows(9, (1, 2, 4)) == [(0, 4, 4), (4, 4, 4), (8, 1, 1)]
    assert split_rows(11, (1, 2, 4)) == [(0, 4, 4), (4, 4, 4), (8, 3, 4)]


@pytest.mark.parametrize("buckets", [(), (0, 1), (2, 1), (1, 1, 2)])
def test_bad_buckets_are_refused(buckets: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="buckets"):
        FastPathOptions(buckets=buckets)


def test_bucket_setting_reads_a_comma_list(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMAGEGENX_BATCH_BUCKETS", "1, 2,4")
    monkeypatch.setenv("IMAGEGENX_COMPILE", "false")
    s = Settings()
    assert (s.batch_buckets, s.compile, s.cuda_graphs) == ([1, 2, 4], False, True)
    with pytest.raises(ValidationError, match="batch_buckets"):
        Settings(batch_buckets=[4, 2])


@pytest.fixture(scope="module")
def engines(tiny_model: Path):  # type: ignore[no-untyped-def]
    from imagegenx.engine.diffusion import DiffusionEngine

    eager = DiffusionEngine.load(tiny_model, "cpu", "fp32")
    padded = DiffusionEngine.load(tiny_model, "cpu", "fp32", fast_path=FastPathOptions(
        compile=False, cuda_graphs=False, buckets=(1, 2, 4), allow_cpu=True))
    return eager, padded


def test_cpu_engines_have_no_fast_path_by_default(engines) -> None:  # type: ignore[no-untyped-def]
    from imagegenx.engine.diffusion import DiffusionEngine

    eager, _ = engines
    assert eager.fast_options is None and eager.warmup() == {}
    plain = DiffusionEngine(unet=eager.unet, vae=eager.vae, text_encoder=eager.text_encoder,
                            tokenizer=eager.tokenizer, scheduler_config=eager.scheduler_config,
                            device=eager.device, dtype=eager.dtype, fast_path=FastPathOptions())
    assert plain.fast_options is None  # CUDA only unless allow_cpu


@pytest.mark.parametrize(("sampler", "n"), [("euler", 3), ("dpmpp_2m", 6)])
def test_padded_and_split_batches_match_eager(engines, sampler: str, n: int) -> None:  # type: ignore[no-untyped-def]
    eager, padded = engines
    samples = tuple(Sample(f"prompt {i}", seed=10 + i, guidance_scale=4.0 + i) for i in range(n))
    spec = BatchSpec(64, 64, 6, sampler, samples)
    assert padded.warmup()["captured_buckets"] == [2, 4, 8]  # UNet rows: 1, 2, 4 images and doubles, from 2
    for a, b in zip(eager.generate(spec), padded.generate(spec), strict=True):
        diff = np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16))
        assert diff.max() <= UINT8_TOL


def test_dropped_rows_leave_a_padded_batch(engines) -> None:  # type: ignore[no-untyped-def]
    eager, padded = engines
    samples = tuple(Sample(f"prompt {i}", seed=20 + i) for i in range(5))
    spec = BatchSpec(64, 64, 6, "dpmpp_2m", samples)

    def drop(done: int, total: int) -> list[int]:
        return [1, 3] if done == 3 else []

    ours, theirs = padded.generate(spec, drop), eager.generate(spec, drop)
    assert [im is None for im in ours] == [False, True, False, True, False]
    for a, b in zip(ours, theirs, strict=True):
        if a is not None:
            assert np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).max() <= UINT8_TOL


def test_step_calls_with_per_row_timesteps_match_eager(engines) -> None:  # type: ignore[no-untyped-def]
    """The step scheduler's calls: rows at different timesteps, padded and split
    across buckets, give each row its own timestep (as the eager UNet does)."""
    eager, padded = engines
    specs = [BatchSpec(64, 64, 3 + i, ("euler", "ddim", "dpmpp_2m", "euler_a")[i % 4],
                       (Sample(f"prompt {i}", seed=30 + i, guidance_scale=3.0 + i),)) for i in range(6)]

    def run(engine):  # type: ignore[no-untyped-def]
        states = []
        for i, spec in enumerate(specs):  # one joins per call: every call mixes timesteps
            states.append(engine.begin(spec))
            engine.step([s for s in states if not s.done])
        while any(not s.done for s in states):
            engine.step([s for s in states if not s.done])
        return [engine.decode([s])[0][0] for s in states]

    for a, b in zip(run(eager), run(padded), strict=True):
        assert np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).max() <= UINT8_TOL


def test_row_buckets_hold_every_row_count() -> None:
    from imagegenx.engine.fastpath import unet_row_buckets

    # No 1-row bucket: a batch of 1 would compile the UNet again (one row runs padded to two).
    assert unet_row_buckets((1, 2, 4, 8, 16, 32)) == (2, 4, 8, 16, 32, 64)
    assert unet_row_buckets((1, 3)) == (2, 3, 6)
    assert unet_row_buckets((4,)) == (4, 8)


def test_padded_path_runs_mixed_guidance_like_eager(engines) -> None:  # type: ignore[no-untyped-def]
    eager, padded = engines
    samples = (Sample("a", 1, 7.5, "", (0.0, 0.4)), Sample("b", 2, 1.0), Sample("c", 3, 5.0, "", (0.2, 1.0)),
               Sample("d", 4, 7.5))
    spec = BatchSpec(64, 64, 5, "euler", samples)
    for a, b in zip(eager.generate(spec), padded.generate(spec), strict=True):
        diff = np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16))
        assert diff.max() <= UINT8_TOL
    state = padded.begin(spec)
    while not state.done:
        padded.step([state])
    for a, b in zip(eager.generate(spec), padded.decode([state])[0], strict=True):
        assert np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).max() <= UINT8_TOL
