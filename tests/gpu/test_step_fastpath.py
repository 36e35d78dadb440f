"""The step scheduler's UNet calls on the GPU fast path: per-row timesteps in
the captured CUDA graphs, and a running set that changes at every call without
a single recompile.

Needs a CUDA GPU (skipped without one); tiny model by default, or the model in
IMAGEGENX_GPU_TEST_MODEL. Tolerances as in test_fastpath.py: compiled kernels,
graph replays and bucket sizes round differently in half precision, so "same
image" is a mean absolute difference of at most MEAN_TOL uint8 levels and a 99th
percentile of at most P99_TOL; a row that took another row's timestep or noise
differs by tens of levels.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from imagegenx.engine.base import BatchSpec, Sample
from imagegenx.engine.diffusion import DiffusionDenoising, DiffusionEngine
from imagegenx.engine.fastpath import FastPathOptions

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

MEAN_TOL = 1.5
P99_TOL = 12.0
DTYPE = os.environ.get("IMAGEGENX_GPU_TEST_DTYPE", "fp16")


@pytest.fixture(scope="module")
def fast(tiny_model: Path) -> Iterator[DiffusionEngine]:
    model = Path(os.environ.get("IMAGEGENX_GPU_TEST_MODEL") or tiny_model)
    engine = DiffusionEngine.load(model, device="cuda", dtype=DTYPE, fast_path=FastPathOptions())
    engine.warmup()
    yield engine


def request(engine: DiffusionEngine, sampler: str, steps: int, seed: int) -> BatchSpec:
    w, h = engine.native_size
    return BatchSpec(width=w, height=h, steps=steps, sampler=sampler,
                     samples=(Sample(f"prompt {seed}", seed=seed, guidance_scale=4.0 + seed % 5),))


def alone(engine: DiffusionEngine, spec: BatchSpec) -> np.ndarray:
    state = engine.begin(spec)
    while not state.done:
        engine.step([state])
    return np.asarray(engine.decode([state])[0][0], dtype=np.int16)


def test_a_changing_running_set_never_recompiles_and_rows_keep_their_own_images(
        fast: DiffusionEngine) -> None:
    samplers = ("euler", "euler_a", "ddim", "dpmpp_2m")
    specs = [request(fast, samplers[i % 4], 4 + (i * 7) % 13, seed=i) for i in range(40)]
    import torch._dynamo

    torch._dynamo.config.error_on_recompile = True  # any recompile from here on raises
    try:
        running: list[tuple[BatchSpec, DiffusionDenoising]] = []
        images: dict[int, np.ndarray] = {}
        sizes = set()
        waiting = list(specs)
        call = 0
        while waiting or running:
            # 0 to 5 requests join at every call: the row count walks across every bucket.
            for _ in range(call % 6):
                if waiting:
                    spec = waiting.pop(0)
                    running.append((spec, fast.begin(spec)))
            if running:
                sizes.add(len(running))
                fast.step([s for _, s in running])
                done = [(spec, s) for spec, s in running if s.done]
                if done:
                    for (spec, _), imgs in zip(done, fast.decode([s for _, s in done])):
                        images[id(spec)] = np.asarray(imgs[0], dtype=np.int16)
                running = [(spec, s) for spec, s in running if not s.done]
            call += 1
    finally:
        torch._dynamo.config.error_on_recompile = False
    assert len(sizes) >= 6, sizes
    for spec in specs[:8]:
        d = np.abs(images[id(spec)] - alone(fast, spec))
        assert d.mean() <= MEAN_TOL and np.percentile(d, 99) <= P99_TOL, (spec.sampler, d.mean())


def test_a_partly_guided_step_waits_for_nothing_and_steps_report_device_time(
        fast: DiffusionEngine) -> None:
    """Rows inside and past their guidance interval share the call: their indices
    reach the GPU without a stream sync (a sync raises in this debug mode); a step
    returns once the step before it has ended, and every step's device time is
    reported once it has ended."""
    w, h = fast.native_size
    spec = BatchSpec(width=w, height=h, steps=8, sampler="euler", samples=(
        Sample("guided all along", seed=1, guidance_scale=6.0, guidance_interval=(0.0, 1.0)),
        Sample("guided at first", seed=2, guidance_scale=6.0, guidance_interval=(0.0, 0.25))))
    state = fast.begin(spec)
    fast.ended_step_seconds()  # forget the steps of earlier tests
    for _ in range(3):  # steps 0 and 1 guide both rows; from step 2 on, the first row only
        fast.step([state])
    torch.cuda.set_sync_debug_mode("error")
    try:
        fast.step([state])  # step 3: the guided row's index for the UNet and for guidance
    finally:
        torch.cuda.set_sync_debug_mode(0)
    early = fast.ended_step_seconds()
    assert early is not None and len(early) >= 3  # step 3 waited for steps 0 to 2: one step ahead
    while not state.done:
        fast.step([state])
    assert len(fast.decode([state])[0]) == 2
    late = fast.ended_step_seconds()  # the decode waited for every step
    assert late is not None and len(early) + len(late) == 8, (early, late)
    assert all(s > 0 for s in early + late)


def test_a_decode_on_its_stream_waits_for_nothing_and_matches_the_decode(fast: DiffusionEngine) -> None:
    """The decode stream (decode_stream.py): queued without a host sync while the
    next UNet call is queued on the main stream; the same pixels as the decode on
    the main stream (the decode there duplicates a lone row, so the tolerances
    above); a row whose latents are not finite fails alone."""
    a, b, c = (fast.begin(request(fast, "euler", n, seed=s)) for s, n in ((11, 3), (12, 6), (13, 1)))
    other = fast.begin(request(fast, "euler", 3, seed=14))
    for _ in range(3):
        fast.step([a, b])
    fast.step([c])
    c.latents = c.latents.clone()
    c.latents[0, 0, 0, 0] = float("nan")  # diverged
    fast.ended_step_seconds()
    torch.cuda.set_sync_debug_mode("error")
    try:
        pending = fast.start_decode([a, c])
        fast.step([b, other])  # queued on the main stream while the decode runs
    finally:
        torch.cuda.set_sync_debug_mode(0)
    got = pending.result()
    assert pending.ready()
    assert isinstance(got[1], ValueError) and "not finite" in str(got[1])
    d = np.abs(np.asarray(got[0][0], dtype=np.int16) - np.asarray(fast.decode([a])[0][0], dtype=np.int16))
    assert d.mean() <= MEAN_TOL and np.percentile(d, 99) <= P99_TOL, d.mean()
