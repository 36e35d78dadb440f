"""Per-row samplers: each row equals diffusers' scheduler run alone, and a row's
latents do not depend on which rows share its batch or when it joined."""
from __future__ import annotations

import inspect
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import imagegenx.engine
from imagegenx.engine import row_samplers as rs
from imagegenx.engine.model_init import SD15_SCHEDULER
from imagegenx.engine.samplers import SAMPLERS, SchedulerConfig, load_scheduler_config, make_scheduler

SHAPE = (4, 8, 8)  # one row's latents (C, H, W)
# Rows against diffusers, both fp32 but with a different order of operations:
# max |difference| <= DIFFUSERS_RTOL * max(1, max |latents|), about 16 fp32 ulps.
# Measured over every case below: at most 5.7e-7 relative (3.8e-6 absolute on
# latents up to 6.7, 20 Euler steps; 1.1e-5 absolute on latents up to 45).
DIFFUSERS_RTOL = 2e-6


def assert_matches_diffusers(got: torch.Tensor, expected: torch.Tensor) -> None:
    assert torch.isfinite(expected).all()
    scale = max(1.0, expected.abs().max().item())
    assert (got - expected).abs().max().item() <= DIFFUSERS_RTOL * scale


_PATTERN = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(1234))


def fake_unet(x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A deterministic, elementwise (so batch-independent) stand-in for the CFG UNet call.

    ``t`` is one timestep per row ([B]) or one for the whole batch (0-d).
    """
    t = t.float().reshape(-1, 1, 1, 1)
    base = 0.8 * x * torch.cos(t / 1000.0)
    return base + 0.3 * torch.sin(t / 97.0 + _PATTERN[0]), base + 0.3 * torch.sin(t / 61.0 + _PATTERN[1])


def write_config(folder: Path, config: SchedulerConfig) -> Path:
    (folder / "scheduler").mkdir(parents=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module", params=["tiny", "shapes", "trailing"])
def config(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> SchedulerConfig:
    """The tiny model's scheduler config (what write_tiny_model writes), the shipped
    shapes model's, and a trailing-spacing variant (another init sigma and timestep grid)."""
    if request.param == "shapes":
        return load_scheduler_config(Path(imagegenx.engine.__file__).parent / "assets" / "shapes")
    extra = {"timestep_spacing": "trailing"} if request.param == "trailing" else {}
    return load_scheduler_config(write_config(tmp_path_factory.mktemp(request.param), {**SD15_SCHEDULER, **extra}))


def initial_noise(seed: int) -> tuple[torch.Tensor, torch.Generator]:
    """As DiffusionEngine.initial_latents draws it: (1, C, h, w) fp32 from a seeded CPU generator."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn((1, *SHAPE), generator=generator, dtype=torch.float32), generator


def diffusers_alone(sampler: str, steps: int, config: SchedulerConfig, seed: int, guidance: float) -> torch.Tensor:
    """The engine's current loop (DiffusionEngine.generate) for one sample."""
    scheduler = make_scheduler(sampler, config)
    scheduler.set_timesteps(steps)
    noise, generator = initial_noise(seed)
    latents = noise * scheduler.init_noise_sigma
    takes_generator = "generator" in inspect.signature(scheduler.step).parameters
    for t in scheduler.timesteps:
        eps_uncond, eps_cond = fake_unet(scheduler.scale_model_input(latents, t), t)
        eps = eps_uncond + guidance * (eps_cond - eps_uncond)
        extra = {"generator": [generator]} if takes_generator else {}
        latents = scheduler.step(eps, t, latents, **extra).prev_sample
    return latents


def step_batch(latents: torch.Tensor, rows: list[rs.RowState]) -> torch.Tensor:
    model_in, t = rs.model_input(latents, rows)
    return rs.advance(latents, rs.guide(*fake_unet(model_in, t), rows), rows)


def rows_alone(sampler: str, steps: int, config: SchedulerConfig, seed: int, guidance: float) -> torch.Tensor:
    noise, generator = initial_noise(seed)
    rows = [rs.start_row(sampler, steps, config, generator, guidance)]
    latents = rs.init_latents(noise, rows)
    while not rows[0].done:
        latents = step_batch(latents, rows)
    return latents


CASES = [(sampler, steps) for sampler in SAMPLERS for steps in (1, 2, 5, 20)] + [("dpmpp_2m", 50)]


@pytest.mark.parametrize(("sampler", "steps"), CASES)
def test_row_alone_equals_diffusers(config: SchedulerConfig, sampler: str, steps: int) -> None:
    expected = diffusers_alone(sampler, steps, config, seed=7, guidance=5.0)
    got = rows_alone(sampler, steps, config, seed=7, guidance=5.0)
    assert_matches_diffusers(got, expected)


def test_schedule_matches_diffusers_timesteps(config: SchedulerConfig) -> None:
    for sampler in SAMPLERS:
        scheduler = make_scheduler(sampler, config)
        scheduler.set_timesteps(12)
        schedule = rs.row_schedule(sampler, 12, config)
        assert schedule.timesteps == tuple(float(t) for t in scheduler.timesteps)
        assert schedule.init_sigma == float(scheduler.init_noise_sigma)
        assert rs.row_schedule(sampler, 12, dict(config)) is schedule  # cached


@dataclass
class Request:
    sampler: str
    steps: int
    seed: int
    guidance: float
    joins_at: int  # the batch step at which the request is admitted


def run_continuous(requests: list[Request], config: SchedulerConfig) -> dict[int, torch.Tensor]:
    """A continuous batch: rows join at their step boundary and leave when done."""
    latents = torch.empty((0, *SHAPE))
    rows: list[rs.RowState] = []
    owners: list[int] = []
    finished: dict[int, torch.Tensor] = {}
    tick = 0
    while len(finished) < len(requests):
        for k, req in enumerate(requests):
            if req.joins_at == tick:
                noise, generator = initial_noise(req.seed)
                row = rs.start_row(req.sampler, req.steps, config, generator, req.guidance)
                latents = torch.cat([latents, rs.init_latents(noise, [row])])
                rows.append(row)
                owners.append(k)
        if rows:
            latents = step_batch(latents, rows)
        keep = [i for i, row in enumerate(rows) if not row.done]
        for i, row in enumerate(rows):
            if row.done:
                finished[owners[i]] = latents[i:i + 1]
        latents, rows, owners = latents[keep], [rows[i] for i in keep], [owners[i] for i in keep]
        tick += 1
    return finished


def test_rows_batched_and_admitted_mid_run_equal_rows_alone(config: SchedulerConfig) -> None:
    requests = [
        Request("dpmpp_2m", 20, seed=1, guidance=7.5, joins_at=0),
        Request("euler_a", 12, seed=2, guidance=3.0, joins_at=0),
        Request("euler", 5, seed=3, guidance=9.0, joins_at=2),
        Request("ddim", 8, seed=4, guidance=1.0, joins_at=3),
        Request("euler_a", 1, seed=5, guidance=6.0, joins_at=4),
        Request("dpmpp_2m", 5, seed=6, guidance=4.0, joins_at=9),
        Request("euler_a", 6, seed=2, guidance=3.0, joins_at=18),  # alone for its last steps
    ]
    finished = run_continuous(requests, config)
    for k, req in enumerate(requests):
        alone = rows_alone(req.sampler, req.steps, config, req.seed, req.guidance)
        assert torch.equal(finished[k], alone), f"request {k} ({req.sampler}) differs from running alone"
        expected = diffusers_alone(req.sampler, req.steps, config, req.seed, req.guidance)
        assert_matches_diffusers(finished[k], expected)


def test_same_seed_same_latents_whatever_the_step_of_admission(config: SchedulerConfig) -> None:
    """An ancestral and a multistep row give the same latents for every admission step."""
    running = Request("dpmpp_2m", 10, seed=11, guidance=7.0, joins_at=0)
    results = {}
    for join in range(0, 10):
        for sampler in ("euler_a", "dpmpp_2m"):
            joined = Request(sampler, 4, seed=12, guidance=7.0, joins_at=join)
            results.setdefault(sampler, []).append(run_continuous([running, joined], config)[1])
    for sampler, outs in results.items():
        assert all(torch.equal(out, outs[0]) for out in outs), sampler


def test_done_rows_are_refused() -> None:
    noise, generator = initial_noise(0)
    rows = [rs.start_row("euler", 1, SD15_SCHEDULER, generator, 7.5)]
    latents = step_batch(rs.init_latents(noise, rows), rows)
    assert rows[0].done and rows[0].index == 1
    with pytest.raises(ValueError, match="finished"):
        rs.model_input(latents, rows)


def test_unsupported_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="prediction_type"):
        rs.row_schedule("euler", 4, {**SD15_SCHEDULER, "prediction_type": "v_prediction"})
    with pytest.raises(ValueError, match="unknown sampler"):
        rs.row_schedule("heun", 4, SD15_SCHEDULER)
