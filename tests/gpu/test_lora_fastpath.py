"""LoRAs on the GPU fast path: merged in place after compile and capture.

The fast engine is warmed up (UNet compiled, one CUDA graph per bucket, the
text encoder graph) before any LoRA is merged; then sets are switched. The
replayed graphs must draw each set as the eager engine does, nothing may be
compiled or captured again, and going back to the base set gives the base
images exactly (the weights are restored bit-exactly, the graphs replay the
same kernels). Tolerances as in test_fastpath.py: mean |diff| at most
``MEAN_TOL`` and 99th percentile at most ``P99_TOL`` uint8 levels between fast
and eager, which differ by half-precision rounding only.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from imagegenx.engine.base import BatchSpec, Sample  # noqa: E402
from imagegenx.engine.diffusion import DiffusionEngine  # noqa: E402
from imagegenx.engine.fastpath import FastPathOptions, unet_row_buckets  # noqa: E402

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

MEAN_TOL = 1.5
P99_TOL = 12.0
STEPS = 20
DTYPE = os.environ.get("IMAGEGENX_GPU_TEST_DTYPE", "fp16")
SAMPLES = (Sample("a photo of a cat", 42, 7.5), Sample("a red car", 7, 5.0), Sample("blue sky", 123, 9.0))
STYLE = (("style", 1.0),)
BOTH = (("detail", -0.7), ("style", 0.6))


@pytest.fixture(scope="module")
def lora_dir(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.integration.lora_files import write_lora

    root = tmp_path_factory.mktemp("loras")
    write_lora(tiny_model, root / "style", seed=1)  # UNet and text encoder
    write_lora(tiny_model, root / "detail", seed=2, unet_rank=2, unet_alpha=2.0, text_rank=None)
    return root


@pytest.fixture(scope="module")
def fast(tiny_model: Path, lora_dir: Path) -> DiffusionEngine:
    # Three samples run padded in bucket 4; fewer buckets keep the warm-up short.
    engine = DiffusionEngine.load(tiny_model, device="cuda", dtype=DTYPE,
                                  fast_path=FastPathOptions(buckets=(1, 2, 4)), lora_dir=lora_dir)
    engine.warmup()
    return engine


@pytest.fixture(scope="module")
def eager(tiny_model: Path, lora_dir: Path) -> DiffusionEngine:
    return DiffusionEngine.load(tiny_model, device="cuda", dtype=DTYPE, lora_dir=lora_dir)


def draw(engine: DiffusionEngine, loras: tuple[tuple[str, float], ...]) -> np.ndarray:
    w, h = engine.native_size
    images = engine.generate(BatchSpec(w, h, STEPS, "euler", SAMPLES, loras=loras))
    return np.stack([np.asarray(im, dtype=np.int16) for im in images])


def assert_close(a: np.ndarray, b: np.ndarray) -> None:
    diff = np.abs(a - b)
    assert diff.mean() <= MEAN_TOL and np.percentile(diff, 99) <= P99_TOL, (diff.mean(), np.percentile(diff, 99))


def prepared(engine: DiffusionEngine) -> tuple[object, ...]:
    """What compile and capture produced: must stay the very same objects."""
    assert engine.fast is not None
    slots = sorted(engine.fast.unet.slots.items())
    return (engine.fast.encode_text, *[obj for _, slot in slots for obj in (slot, slot.graph, slot.out)])


def test_lora_sets_reach_the_captured_graphs(fast: DiffusionEngine, eager: DiffusionEngine) -> None:
    before = prepared(fast)
    base = draw(fast, ())
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for loras in (STYLE, BOTH):
        got = draw(fast, loras)
        assert_close(got, draw(eager, loras))
        assert np.abs(got - base).mean() > 5  # the set really acts under the graphs
    assert np.array_equal(draw(fast, ()), base)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs  # nothing compiled again
    after = prepared(fast)
    # The text encoder, then slot, graph and output of each UNet-row bucket: image
    # buckets 1, 2 and 4 run in row buckets 2, 4 and 8 (two rows per guided image).
    assert len(after) == len(before) == 1 + 3 * len(unet_row_buckets((1, 2, 4))) == 10
    assert all(x is y for x, y in zip(after, before))  # nor captured again


def test_switching_restores_gpu_weights_bit_exactly(fast: DiffusionEngine) -> None:
    fast.loras.use(())
    modules = (fast.unet, fast.text_encoder)
    base = [t.detach().clone() for m in modules for t in m.state_dict().values()]
    for loras in (STYLE, BOTH, STYLE, ()):
        fast.loras.use(loras)
    now = [t.detach() for m in modules for t in m.state_dict().values()]
    assert all(torch.equal(a, b) for a, b in zip(base, now))
