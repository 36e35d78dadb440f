"""The GPU fast path (imagegenx/engine/fastpath.py) against the eager modules.

These tests need a CUDA GPU and are skipped without one. They run the tiny
model by default (compiles in well under a minute); set IMAGEGENX_GPU_TEST_MODEL
to a model folder (e.g. one written by ``imagegenx model init --arch sd15``) to
run them on another model, and IMAGEGENX_GPU_TEST_DTYPE (fp16, bf16) for the dtype.

Tolerances. Compiled kernels, CUDA-graph replays and different batch sizes use
different kernels, so results differ by half-precision rounding that 20
denoising steps carry into the image. "Same image" is checked on uint8 pixels
as a mean absolute difference of at most ``MEAN_TOL`` levels and a 99th
percentile of at most ``P99_TOL`` levels. A real bug (rows of another sample,
the unconditional and conditional halves swapped, a padded row leaking in)
changes the image by tens of levels on average.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from imagegenx.engine.base import BatchSpec, Sample  # noqa: E402
from imagegenx.engine.diffusion import DiffusionEngine  # noqa: E402
from imagegenx.engine.fastpath import DEFAULT_BUCKETS, FastPathOptions, unet_row_buckets  # noqa: E402

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

MEAN_TOL = 1.5  # uint8 levels
P99_TOL = 12.0  # uint8 levels
STEPS = 20
DTYPE = os.environ.get("IMAGEGENX_GPU_TEST_DTYPE", "fp16")
REPORT = os.environ.get("IMAGEGENX_GPU_TEST_REPORT")  # a JSON file to record measured differences in

CAT = Sample("a photo of a cat", seed=42, guidance_scale=7.5)
OTHERS = tuple(Sample(f"other prompt {i}", seed=1000 + i, guidance_scale=3.0 + i) for i in range(40))
measured: dict[str, dict[str, float]] = {}


@pytest.fixture(scope="module")
def model_dir(tiny_model: Path) -> Path:
    given = os.environ.get("IMAGEGENX_GPU_TEST_MODEL")
    return Path(given) if given else tiny_model


@pytest.fixture(scope="module")
def fast(model_dir: Path) -> Iterator[DiffusionEngine]:
    engine = DiffusionEngine.load(model_dir, device="cuda", dtype=DTYPE, fast_path=FastPathOptions())
    engine.warmup()
    yield engine
    if REPORT:
        Path(REPORT).write_text(json.dumps({"dtype": DTYPE, "model": str(model_dir), "warmup": engine.warmup_report,
                                            "differences": measured}, indent=2, default=str))


@pytest.fixture(scope="module")
def eager(model_dir: Path) -> DiffusionEngine:
    return DiffusionEngine.load(model_dir, device="cuda", dtype=DTYPE)


def spec(engine: DiffusionEngine, *samples: Sample, sampler: str = "euler", size: tuple[int, int] | None = None,
         ) -> BatchSpec:
    w, h = size or engine.native_size
    return BatchSpec(width=w, height=h, steps=STEPS, sampler=sampler, samples=samples)


def assert_close(name: str, a: object, b: object) -> None:
    x = np.asarray(a, dtype=np.int16)
    y = np.asarray(b, dtype=np.int16)
    d = np.abs(x - y)
    stats = {"mean": float(d.mean()), "p99": float(np.percentile(d, 99)), "max": float(d.max())}
    measured[name] = stats
    assert stats["mean"] <= MEAN_TOL and stats["p99"] <= P99_TOL, f"{name}: {stats}"


def test_warmup_covers_every_bucket(fast: DiffusionEngine) -> None:
    report = fast.warmup_report
    assert fast.fast is not None
    # The UNet is captured per bucket of UNet rows (two per guided image): 2 to 64.
    assert report["captured_buckets"] == list(unet_row_buckets(DEFAULT_BUCKETS)) == [2, 4, 8, 16, 32, 64]
    assert sorted(report["vae_bucket_s"]) == list(DEFAULT_BUCKETS)
    assert all(slot.graph is not None for slot in fast.fast.unet.slots.values())
    assert report["compile"] and report["cuda_graphs"]


def test_no_compilation_after_warmup(fast: DiffusionEngine) -> None:
    """Every bucket size (and a padded and a split size) runs without compiling again."""
    from torch._dynamo.utils import counters

    before = counters["stats"]["unique_graphs"]
    for n in (1, 3, 8, 33):
        images = fast.generate(spec(fast, *OTHERS[:n]))
        assert all(im is not None for im in images)
    assert counters["stats"]["unique_graphs"] == before


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m"])
def test_fast_path_matches_eager(fast: DiffusionEngine, eager: DiffusionEngine, sampler: str) -> None:
    batch = (CAT, *OTHERS[:3])
    for i, (a, b) in enumerate(zip(fast.generate(spec(fast, *batch, sampler=sampler)),
                                   eager.generate(spec(eager, *batch, sampler=sampler)), strict=True)):
        assert_close(f"fast_vs_eager_{sampler}_{i}", a, b)


def test_same_seed_alone_batched_and_padded(fast: DiffusionEngine) -> None:
    alone = fast.generate(spec(fast, CAT))[0]  # bucket 1
    full = fast.generate(spec(fast, CAT, *OTHERS[:3]))[0]  # bucket 4, no padding
    padded = fast.generate(spec(fast, *OTHERS[:2], CAT))[2]  # 3 rows padded to bucket 4
    padded_big = fast.generate(spec(fast, *OTHERS[:4], CAT))[4]  # 5 rows padded to bucket 8
    assert_close("alone_vs_batched", alone, full)
    assert_close("alone_vs_padded", alone, padded)
    assert_close("alone_vs_padded_8", alone, padded_big)


def test_batch_larger_than_largest_bucket_is_split(fast: DiffusionEngine) -> None:
    batch = (*OTHERS[:32], CAT)  # 33 rows: a bucket of 32 and a bucket of 1
    images = fast.generate(spec(fast, *batch))
    assert all(im is not None for im in images)
    assert_close("split_last_row", fast.generate(spec(fast, CAT))[0], images[32])
    assert_close("split_first_row", fast.generate(spec(fast, OTHERS[0]))[0], images[0])


def test_other_sizes_run_eagerly(fast: DiffusionEngine, eager: DiffusionEngine) -> None:
    w, h = fast.native_size
    size = (w + 32, h)
    a = fast.generate(spec(fast, CAT, size=size))[0]
    b = eager.generate(spec(eager, CAT, size=size))[0]
    assert a is not None and a.size == size
    assert_close("other_size_vs_eager", a, b)


def test_revoked_rows_leave_a_graphed_batch(fast: DiffusionEngine) -> None:
    batch = (CAT, *OTHERS[:4])
    out = fast.generate(spec(fast, *batch), lambda done, total: [1, 3] if done == 5 else [])
    assert [im is None for im in out] == [False, True, False, True, False]
    assert_close("after_drop_vs_alone", fast.generate(spec(fast, CAT))[0], out[0])
