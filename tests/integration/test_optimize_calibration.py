"""Calibration capture records the UNet's real inputs along real trajectories.

Checked with DDIM, whose ``scale_model_input`` is the identity, so a recorded
sample *is* the latent state: the first equals the seeded starting noise, and
replaying the recorded inputs through the UNet, classifier-free guidance and
the scheduler step reproduces the next recorded sample. Random inputs, or
inputs from another run, would fail both.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from imagegenx.engine.diffusion import DiffusionEngine  # noqa: E402
from imagegenx.engine.samplers import make_scheduler  # noqa: E402
from optimize.calibration import CalibrationSet, capture  # noqa: E402

PROMPTS = ["a red circle on a blue background", "a green triangle on a white background"]
STEPS = 5
GUIDANCE = 7.5


@pytest.fixture(scope="module")
def engine(tiny_model: Path) -> DiffusionEngine:
    return DiffusionEngine.load(tiny_model, device="cpu", dtype="fp32")


def test_records_follow_the_real_denoising_trajectory(engine: DiffusionEngine) -> None:
    calib = capture(engine, PROMPTS, steps=STEPS, sampler="ddim", every=1, batch_size=2, guidance=GUIDANCE, seed=3)
    n = len(PROMPTS)
    scheduler = make_scheduler("ddim", engine.scheduler_config)
    scheduler.set_timesteps(STEPS)
    assert [r.step for r in calib.records] == list(range(STEPS))
    for record, t in zip(calib.records, scheduler.timesteps, strict=True):
        assert record.sample.shape[0] == 2 * n  # uncond and cond rows, as the engine runs them
        assert torch.equal(record.timestep, torch.full((2 * n,), float(t)))
        assert torch.equal(record.sample[:n], record.sample[n:])

    noise, _ = engine.initial_latents([3, 4], *engine.native_size)
    first = calib.records[0].sample[:n]
    torch.testing.assert_close(first, noise * scheduler.init_noise_sigma)

    context = calib.contexts[0]
    with torch.no_grad():
        for record, following, t in zip(calib.records, calib.records[1:], scheduler.timesteps):
            eps = engine.unet(record.sample, record.timestep, encoder_hidden_states=context).sample
            uncond, cond = eps.chunk(2)
            latents = scheduler.step(uncond + GUIDANCE * (cond - uncond), t, record.sample[:n]).prev_sample
            torch.testing.assert_close(following.sample[:n], latents, atol=1e-5, rtol=1e-5)
    last = calib.records[-1].sample[:n]
    assert not torch.allclose(last, first, atol=0.1)  # later latents are no longer the starting noise


def test_subsampling_and_file_round_trip(engine: DiffusionEngine, tmp_path: Path) -> None:
    calib = capture(engine, PROMPTS * 2, steps=STEPS, every=2, batch_size=2)
    assert [r.step for r in calib.records] == [0, 2, 4, 0, 2, 4]
    assert [r.batch for r in calib.records] == [0, 0, 0, 1, 1, 1] and len(calib.contexts) == 2
    path = tmp_path / "calib.pt"
    calib.save(path)
    loaded = CalibrationSet.load(path)
    assert loaded.meta["steps"] == STEPS and loaded.meta["prompts"] == PROMPTS * 2
    for (a, b) in zip(calib.inputs(), loaded.inputs()):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
