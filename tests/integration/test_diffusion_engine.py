"""The diffusion engine on the tiny embedded model: real tokenizer, text
encoder, UNet, schedulers and VAE, small enough to run on a CPU in seconds.

Numerical tolerances: batching changes only the order of float operations
inside the convolution and matmul kernels (~1e-7 relative per UNet call on
CPU). Over 20 steps that moves a few pixels across a uint8 rounding boundary,
so "same image" is checked as a maximum absolute difference of at most
``UINT8_TOL`` levels (measured: 1 on x86 CPU, most pixels exactly equal),
together with a cap on how many pixels may differ at all. A real bug (noise,
guidance or solver history from another sample) changes nearly every pixel by
far more than that.
"""
from __future__ import annotations

import os
from collections.abc import Collection
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from diffusers import StableDiffusionPipeline  # noqa: E402
from PIL import Image  # noqa: E402

from imagegenx.engine.base import BatchSpec, Engine, Sample  # noqa: E402
from imagegenx.engine.diffusion import DiffusionEngine  # noqa: E402
from imagegenx.engine.model_init import (  # noqa: E402
    SD15_TEXT_ENCODER,
    SD15_UNET,
    SD15_VAE,
    ensure_model,
    write_tiny_model,
)
from imagegenx.engine.samplers import SAMPLERS, make_scheduler  # noqa: E402

UINT8_TOL = 2  # max |a - b| in uint8 levels between two runs of the same sample
DIFF_FRACTION = 0.01  # at most this share of channel values may differ at all
STEPS = 20

CAT = Sample("a photo of a cat", seed=42, guidance_scale=7.5)
OTHERS = (
    Sample("a red sports car", seed=7, guidance_scale=3.0),
    Sample("blue sky over mountains", seed=123, guidance_scale=9.0, negative_prompt="blurry"),
    Sample("a dog on a sofa", seed=2024, guidance_scale=7.5),
)


@pytest.fixture(scope="module")
def engine(tiny_model: Path) -> DiffusionEngine:
    return DiffusionEngine.load(tiny_model, device="cpu", dtype="fp32")


def spec(sampler: str, *samples: Sample, width: int = 64, height: int = 64) -> BatchSpec:
    return BatchSpec(width=width, height=height, steps=STEPS, sampler=sampler, samples=samples)


def pixels(image: Image.Image | None) -> np.ndarray:
    assert image is not None
    return np.asarray(image).astype(np.int16)


def assert_same_image(a: Image.Image | None, b: Image.Image | None) -> None:
    diff = np.abs(pixels(a) - pixels(b))
    assert diff.max() <= UINT8_TOL, f"max difference {diff.max()} levels"
    assert (diff > 0).mean() <= DIFF_FRACTION, f"{(diff > 0).mean():.2%} of values differ"


# --- the model folder -------------------------------------------------------------


def test_tiny_model_is_deterministic_per_seed(tiny_model: Path, tmp_path: Path) -> None:
    again = write_tiny_model(tmp_path / "again", seed=0)
    other = write_tiny_model(tmp_path / "other", seed=1)
    weights = sorted(p.relative_to(tiny_model) for p in tiny_model.rglob("*.safetensors"))
    assert [p.parts[0] for p in weights] == ["text_encoder", "unet", "vae"]
    for rel in weights:
        assert (tiny_model / rel).read_bytes() == (again / rel).read_bytes()
        assert (tiny_model / rel).read_bytes() != (other / rel).read_bytes()


def test_ensure_model_writes_once(tmp_path: Path) -> None:
    target = tmp_path / "default"
    assert ensure_model(target) == target
    stamp = (target / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns
    ensure_model(target)
    assert (target / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns == stamp
    assert not [p for p in tmp_path.iterdir() if p.name != "default"]  # no staging left over


def test_diffusers_pipeline_loads_the_folder(tiny_model: Path) -> None:
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model, local_files_only=True, safety_checker=None)
    assert type(pipe.unet).__name__ == "UNet2DConditionModel"
    assert type(pipe.vae).__name__ == "AutoencoderKL"
    assert type(pipe.text_encoder).__name__ == "CLIPTextModel"
    assert pipe.tokenizer.model_max_length == 77
    assert pipe.vae_scale_factor == 8
    assert pipe.scheduler.config.beta_schedule == "scaled_linear"
    assert pipe.scheduler.config.steps_offset == 1


def test_sd15_architecture_sizes() -> None:
    """The full-size configs build SD1.5's published parameter counts (meta tensors: no memory)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET)
        vae = AutoencoderKL(**SD15_VAE)
        text = CLIPTextModel(CLIPTextConfig(**SD15_TEXT_ENCODER))
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(unet) == 859_520_964
    assert count(vae) == 83_653_863
    assert count(text) == 123_060_480


# --- the engine -------------------------------------------------------------------


def test_engine_contract(engine: DiffusionEngine) -> None:
    assert isinstance(engine, Engine)
    assert engine.native_size == (64, 64)
    assert engine.samplers == SAMPLERS == ("euler", "euler_a", "ddim", "dpmpp_2m")


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("size", [(64, 64), (96, 48)])
def test_generates_rgb_images_of_requested_size(engine: DiffusionEngine, sampler: str, size: tuple[int, int]) -> None:
    width, height = size
    images = engine.generate(spec(sampler, CAT, OTHERS[0], width=width, height=height))
    assert len(images) == 2
    for image in images:
        assert image is not None and image.mode == "RGB" and image.size == (width, height)
        assert pixels(image).std() > 5  # not a flat or blank picture


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_seed_gives_same_image_alone_or_batched(engine: DiffusionEngine, sampler: str) -> None:
    """Batch invariance: the cat alone vs. the cat at position 2 of 4 with other
    prompts, seeds and guidance. Within UINT8_TOL (see the module docstring)."""
    alone = engine.generate(spec(sampler, CAT))[0]
    batched = engine.generate(spec(sampler, OTHERS[0], OTHERS[1], CAT, OTHERS[2]))
    assert_same_image(batched[2], alone)


def test_different_seeds_give_different_images(engine: DiffusionEngine) -> None:
    a, b = engine.generate(spec("euler", CAT, Sample(CAT.prompt, seed=CAT.seed + 1)))
    assert np.abs(pixels(a) - pixels(b)).mean() > 10


def test_prompt_and_negative_prompt_condition_the_image(engine: DiffusionEngine) -> None:
    base, other_prompt, other_negative = engine.generate(
        spec("euler", CAT, Sample("a bowl of soup", CAT.seed), Sample(CAT.prompt, CAT.seed, negative_prompt="dark"))
    )
    assert np.abs(pixels(base) - pixels(other_prompt)).mean() > 1
    assert np.abs(pixels(base) - pixels(other_negative)).mean() > 1


def test_guidance_is_per_sample(engine: DiffusionEngine) -> None:
    """Same prompt and seed, three guidance scales in one batch: each equals its
    own run alone, and the scales really change the picture."""
    variants = [Sample(CAT.prompt, CAT.seed, guidance_scale=g) for g in (1.0, 5.0, 12.0)]
    batched = engine.generate(spec("euler", *variants))
    for variant, image in zip(variants, batched):
        assert_same_image(image, engine.generate(spec("euler", variant))[0])
    assert np.abs(pixels(batched[0]) - pixels(batched[2])).mean() > 5


def test_prompt_embeddings_are_cached(engine: DiffusionEngine) -> None:
    engine.generate(spec("euler", Sample("a lighthouse at dusk", 1)))
    misses = engine.prompt_cache.misses
    engine.generate(spec("euler", Sample("a lighthouse at dusk", 2), Sample("a lighthouse at dusk", 3)))
    assert engine.prompt_cache.misses == misses  # prompt and "" both came from the cache


class DropAt:
    """on_step callback that removes given samples at given step boundaries."""

    def __init__(self, plan: dict[int, Collection[int]]) -> None:
        self.plan = plan
        self.calls: list[tuple[int, int]] = []

    def __call__(self, done: int, total: int) -> Collection[int]:
        self.calls.append((done, total))
        return self.plan.get(done, ())


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_dropped_samples_return_none_and_leave_others_intact(engine: DiffusionEngine, sampler: str) -> None:
    """Samples 1 and 3 leave mid-way (after 5 and 12 steps); 0 and 2 must equal
    a batch that never held them. For dpmpp_2m this needs the solver's stored
    model outputs to shrink with the batch."""
    batch = (CAT, OTHERS[0], OTHERS[1], OTHERS[2])
    callback = DropAt({5: [1], 12: [3, 1]})  # re-dropping a gone sample is harmless
    result = engine.generate(spec(sampler, *batch), on_step=callback)
    assert result[1] is None and result[3] is None
    assert callback.calls == [(i, STEPS) for i in range(STEPS + 1)]
    reference = engine.generate(spec(sampler, batch[0], batch[2]))
    assert_same_image(result[0], reference[0])
    assert_same_image(result[2], reference[1])


def test_drop_before_start_after_end_and_everything(engine: DiffusionEngine) -> None:
    result = engine.generate(spec("euler", CAT, OTHERS[0]), on_step=DropAt({0: [0], STEPS: [1]}))
    assert result == [None, None]
    callback = DropAt({3: [0, 1]})
    assert engine.generate(spec("dpmpp_2m", CAT, OTHERS[0]), on_step=callback) == [None, None]
    assert callback.calls[-1] == (3, STEPS)  # no more steps once the batch is empty


@pytest.mark.parametrize(
    "bad",
    [
        BatchSpec(64, 64, STEPS, "plms", (CAT,)),
        BatchSpec(60, 64, STEPS, "euler", (CAT,)),
        BatchSpec(64, 0, STEPS, "euler", (CAT,)),
        BatchSpec(64, 64, 0, "euler", (CAT,)),
    ],
)
def test_rejects_invalid_specs(engine: DiffusionEngine, bad: BatchSpec) -> None:
    with pytest.raises(ValueError):
        engine.generate(bad)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_matches_diffusers_pipeline(engine: DiffusionEngine, tiny_model: Path, sampler: str) -> None:
    """Our loop equals StableDiffusionPipeline for one sample: same components,
    scheduler, seeded CPU generator (used for the start noise and, for euler_a,
    the ancestral noise), guidance and steps. Tolerance: 1/255 in [0, 1] units
    after rounding both to uint8 (same float ops, so it is exact here)."""
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model, local_files_only=True, safety_checker=None)
    pipe.scheduler = make_scheduler(sampler, engine.scheduler_config)
    pipe.set_progress_bar_config(disable=True)
    sample = Sample("a photo of a cat", seed=1234, guidance_scale=6.0)
    theirs = pipe(
        sample.prompt,
        height=64,
        width=48,
        num_inference_steps=STEPS,
        guidance_scale=sample.guidance_scale,
        negative_prompt=sample.negative_prompt,
        generator=torch.Generator(device="cpu").manual_seed(sample.seed),
        output_type="np",
    ).images[0]
    ours = engine.generate(spec(sampler, sample, width=48, height=64))[0]
    theirs_u8 = (theirs * 255).round().astype(np.int16)
    assert np.abs(pixels(ours) - theirs_u8).max() <= 1
