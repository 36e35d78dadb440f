"""The diffusion engine's step API (step scheduler) on the tiny model, CPU.

A request gives the same pixels alone, batched with others, or admitted into
a running set at any step, and the same as the request path (``generate``) for
each sampler. Tolerance, as in test_diffusion_engine.py: a batch changes only
the order of float operations inside the kernels, so at most 1 uint8 level
(1/255) of difference is allowed; a real mix-up (another row's noise, guidance,
timestep or solver history) changes nearly every pixel by far more.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imagegenx.engine.base import BatchSpec, Sample, is_step_engine
from imagegenx.engine.diffusion import DiffusionDenoising, DiffusionEngine
from imagegenx.engine.samplers import SAMPLERS

pytestmark = pytest.mark.integration

UINT8_TOL = 1


@pytest.fixture(scope="module")
def engine(tiny_model: Path) -> DiffusionEngine:
    return DiffusionEngine.load(tiny_model, device="cpu", dtype="fp32")


def request(sampler: str, steps: int, *samples: Sample) -> BatchSpec:
    return BatchSpec(width=64, height=64, steps=steps, sampler=sampler, samples=samples)


def run_alone(engine: DiffusionEngine, spec: BatchSpec) -> list[Image.Image]:
    state = engine.begin(spec)
    while not state.done:
        engine.step([state])
    return engine.decode([state])[0]


def run_mixed(engine: DiffusionEngine, arrivals: dict[int, list[BatchSpec]]) -> dict[int, list[Image.Image]]:
    """Step a running set where requests join at the given call numbers; images by spec id."""
    running: list[tuple[BatchSpec, DiffusionDenoising]] = []
    out: dict[int, list[Image.Image]] = {}
    call = 0
    while arrivals or running:
        for spec in arrivals.pop(call, []):
            running.append((spec, engine.begin(spec)))
        if running:
            engine.step([s for _, s in running])
            done = [(spec, s) for spec, s in running if s.done]
            if done:
                for (spec, _), images in zip(done, engine.decode([s for _, s in done])):
                    out[id(spec)] = images
            running = [(spec, s) for spec, s in running if not s.done]
        call += 1
    return out


def max_diff(a: Sequence[Image.Image], b: Sequence[Image.Image]) -> int:
    assert len(a) == len(b)
    return max(int(np.abs(np.asarray(x, dtype=np.int16) - np.asarray(y, dtype=np.int16)).max())
               for x, y in zip(a, b))


def test_the_engine_has_the_step_api(engine: DiffusionEngine) -> None:
    assert is_step_engine(engine)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_a_request_alone_equals_the_request_path(engine: DiffusionEngine, sampler: str) -> None:
    spec = request(sampler, 8, Sample("a red circle", seed=11, guidance_scale=7.5),
                   Sample("a red circle", seed=12, guidance_scale=7.5))
    stepped = run_alone(engine, spec)
    whole = [im for im in engine.generate(spec) if im is not None]
    assert max_diff(stepped, whole) <= UINT8_TOL


def test_requests_admitted_at_any_step_equal_themselves_alone(engine: DiffusionEngine) -> None:
    a = request("euler", 10, Sample("a cat", seed=1, guidance_scale=7.5),
                Sample("a cat", seed=2, guidance_scale=7.5))
    b = request("dpmpp_2m", 6, Sample("a blue square", seed=3, guidance_scale=3.0,
                                      negative_prompt="blurry"))
    c = request("euler_a", 7, Sample("a green triangle", seed=4, guidance_scale=9.0))
    d = request("ddim", 3, Sample("a dog", seed=5, guidance_scale=5.0))
    e = request("euler", 4, Sample("a cat", seed=1, guidance_scale=7.5))  # same prompt and seed as a's first
    mixed = run_mixed(engine, {0: [a], 2: [b, c], 5: [d], 6: [e]})
    for spec in (a, b, c, d, e):
        assert max_diff(mixed[id(spec)], run_alone(engine, spec)) <= UINT8_TOL, spec.sampler


def test_a_failed_call_leaves_every_state_as_it_was(engine: DiffusionEngine,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    spec = request("dpmpp_2m", 5, Sample("a cat", seed=9))
    state = engine.begin(spec)
    engine.step([state])
    before = (state.index, state.latents.clone())

    def broken(*_: object, **__: object) -> None:
        raise RuntimeError("the UNet broke")

    monkeypatch.setattr("imagegenx.engine.diffusion.cfg_unet_eager", broken)
    with pytest.raises(RuntimeError):
        engine.step([state])
    assert state.index == before[0] and bool((state.latents == before[1]).all())
    monkeypatch.undo()
    while not state.done:
        engine.step([state])
    assert max_diff(engine.decode([state])[0], run_alone(engine, spec)) == 0


def test_diverged_latents_fail_only_their_request(engine: DiffusionEngine) -> None:
    good = engine.begin(request("euler", 1, Sample("a cat", seed=1)))
    bad = engine.begin(request("euler", 1, Sample("a dog", seed=2)))
    engine.step([good, bad])
    bad.latents = bad.latents * float("nan")
    with pytest.raises(ValueError, match="not finite"):
        engine.decode([good, bad])
    assert len(engine.decode([good])[0]) == 1
