"""Named LoRAs in the diffusion engine (tiny model, CPU): merged in place, against
diffusers' own LoRA path, restored bit-exactly, keyed in the prompt cache.

Tolerance against diffusers: at most ``UINT8_TOL`` uint8 level per channel.
diffusers keeps the LoRA as extra layers (``W x + s * B (A x)``), we merge it
(``(W + s * B A) x``): the same math in another float order, about 1e-7
relative per layer in fp32, which after the steps can move a pixel across
one rounding level (measured, 10 steps: euler identical, dpmpp_2m one channel
value of 12288 off by 1).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from diffusers import StableDiffusionPipeline, UNet2DConditionModel  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from imagegenx.engine.base import BatchSpec, Sample  # noqa: E402
from imagegenx.engine.diffusion import DiffusionEngine  # noqa: E402
from imagegenx.engine.lora import LoraLibrary, LoraMerger  # noqa: E402
from imagegenx.engine.samplers import make_scheduler  # noqa: E402
from imagegenx.errors import GenerationError  # noqa: E402
from imagegenx.lora_catalog import LoraCatalog, LoraNotFound  # noqa: E402
from imagegenx.pipeline import BatchPipeline  # noqa: E402
from imagegenx.request_state import RequestState  # noqa: E402
from imagegenx.schemas import GenerateRequest  # noqa: E402
from imagegenx.storage import LocalStorage  # noqa: E402
from tests.integration.lora_files import write_kohya, write_lora  # noqa: E402

STEPS = 10
UINT8_TOL = 1
CAT = Sample("a photo of a cat", seed=42, guidance_scale=7.5)


@pytest.fixture(scope="module")
def lora_dir(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("loras")
    # "style": UNet (alpha 8, rank 4: scale 2, from the file's metadata) and text encoder.
    style = write_lora(tiny_model, root / "style", seed=1, unet_rank=4, unet_alpha=8.0, text_rank=2, text_alpha=2.0)
    write_kohya(style, root / "style-kohya", unet_alpha=8.0, text_alpha=2.0)
    write_lora(tiny_model, root / "detail", seed=2, unet_rank=2, unet_alpha=2.0, text_rank=None)  # UNet only
    return root


@pytest.fixture(scope="module")
def engine(tiny_model: Path, lora_dir: Path) -> DiffusionEngine:
    return DiffusionEngine.load(tiny_model, device="cpu", dtype="fp32", lora_dir=lora_dir)


def draw(engine: DiffusionEngine, *loras: tuple[str, float], sample: Sample = CAT) -> np.ndarray:
    image = engine.generate(BatchSpec(64, 64, STEPS, "euler", (sample,), loras=tuple(loras)))[0]
    assert image is not None
    return np.asarray(image).astype(np.int16)


def weights(*modules: torch.nn.Module) -> list[torch.Tensor]:
    return [t.detach().clone() for m in modules for t in m.state_dict().values()]


def test_lora_changes_the_image_and_weight_zero_is_the_base(engine: DiffusionEngine) -> None:
    base = draw(engine)
    styled = draw(engine, ("style", 1.0))
    half = draw(engine, ("style", 0.5))
    assert np.abs(styled - base).mean() > 5
    assert 0 < np.abs(half - base).mean() < np.abs(styled - base).mean()
    assert np.array_equal(draw(engine, ("style", 0.0)), base)
    # Through the request: weight 0 leaves the LoRA out of the set (and the batch key).
    request = GenerateRequest(prompt="x", lora=["style", "detail"], lora_weight=[0, 1.5])
    assert request.lora_set() == (("detail", 1.5),)


def test_kohya_file_gives_the_same_image(engine: DiffusionEngine) -> None:
    assert np.array_equal(draw(engine, ("style-kohya", 1.0)), draw(engine, ("style", 1.0)))


def test_matches_diffusers_lora_path(engine: DiffusionEngine, tiny_model: Path, lora_dir: Path) -> None:
    """Two LoRAs with weights 0.7 and -0.5: diffusers' load_lora_weights + set_adapters
    (peft layers on the UNet and the text encoder) against our in-place merge."""
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model, local_files_only=True, safety_checker=None)
    pipe.scheduler = make_scheduler("euler", engine.scheduler_config)
    pipe.set_progress_bar_config(disable=True)
    for name in ("style", "detail"):
        pipe.load_lora_weights(str(lora_dir / name), weight_name="pytorch_lora_weights.safetensors",
                               adapter_name=name)
    pipe.set_adapters(["style", "detail"], adapter_weights=[0.7, -0.5])
    theirs = pipe(CAT.prompt, height=64, width=64, num_inference_steps=STEPS, guidance_scale=CAT.guidance_scale,
                  generator=torch.Generator(device="cpu").manual_seed(CAT.seed), output_type="np").images[0]
    ours = draw(engine, ("detail", -0.5), ("style", 0.7))
    diff = np.abs(ours - (theirs * 255).round().astype(np.int16))
    assert diff.max() <= UINT8_TOL, diff.max()
    assert np.abs(ours - draw(engine)).mean() > 5  # and the LoRAs really acted


def test_switching_sets_restores_the_base_weights_bit_exactly(engine: DiffusionEngine) -> None:
    engine.loras.use(())
    base = weights(engine.unet, engine.text_encoder)
    for loras in [(("style", 1.0),), (("detail", -2.0), ("style", 0.3)), (("detail", 1.0),), ()]:
        assert engine.loras.use(loras)
        changed = weights(engine.unet, engine.text_encoder)
        assert (loras == ()) == all(torch.equal(a, b) for a, b in zip(base, changed))
    assert all(torch.equal(a, b) for a, b in zip(base, weights(engine.unet, engine.text_encoder)))
    assert not engine.loras.use(())  # the active set: nothing to do


def test_same_set_is_not_merged_again(engine: DiffusionEngine) -> None:
    engine.loras.use((("style", 1.0),))
    stamp = [p.data_ptr() for p in engine.unet.parameters()]
    assert not engine.loras.use((("style", 1.0),))
    assert [p.data_ptr() for p in engine.unet.parameters()] == stamp  # same tensors, in place


def test_prompt_cache_keys_on_text_encoder_loras(engine: DiffusionEngine) -> None:
    prompt = Sample("a lighthouse at dusk", seed=3, negative_prompt="fog")
    draw(engine, sample=prompt)
    misses = engine.prompt_cache.misses
    draw(engine, ("detail", 1.0), sample=prompt)  # UNet only: the base embeddings serve
    assert engine.prompt_cache.misses == misses
    draw(engine, ("style", 1.0), sample=prompt)  # changes the text encoder: encoded again
    assert engine.prompt_cache.misses == misses + 2  # prompt and ""
    draw(engine, sample=prompt)
    assert engine.prompt_cache.misses == misses + 2


def test_fused_projections_get_the_update(tiny_model: Path, lora_dir: Path) -> None:
    """The GPU fast path fuses to_q/to_k/to_v (fastpath.optimise_modules): the
    merge must reach the fused weights, and restore them exactly."""
    plain = UNet2DConditionModel.from_pretrained(tiny_model, subfolder="unet", local_files_only=True).eval()
    fused = UNet2DConditionModel.from_pretrained(tiny_model, subfolder="unet", local_files_only=True).eval()
    fused.fuse_qkv_projections()
    before = weights(fused)
    detail = LoraLibrary(LoraCatalog(lora_dir)).get("detail")  # UNet only: to_qkv and to_kv
    merger = LoraMerger({"unet": fused})
    merger.activate([(detail, 0.8)])
    LoraMerger({"unet": plain}).activate([(detail, 0.8)])
    x = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(0))
    ctx = torch.randn((2, 77, 32), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        want, got = plain(x, 500, ctx).sample, fused(x, 500, ctx).sample
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    merger.activate([])
    assert all(torch.equal(a, b) for a, b in zip(before, weights(fused)))


def test_unknown_name_fails_the_request_with_a_clear_error(engine: DiffusionEngine, tmp_path: Path) -> None:
    with pytest.raises(LoraNotFound, match=r"unknown LoRA 'nope'.*available: detail, style, style-kohya"):
        engine.generate(BatchSpec(64, 64, 2, "euler", (CAT,), loras=(("nope", 1.0),)))
    pipeline = BatchPipeline(engine, LocalStorage(tmp_path), "http://x", "tiny")
    request = GenerateRequest(prompt="x", seed=1, width=64, height=64, steps=2, lora="nope")
    outcome = pipeline.run([RequestState("j1", request)])["j1"]
    assert isinstance(outcome.error, GenerationError) and "unknown LoRA 'nope'" in str(outcome.error)


def test_unfit_lora_changes_nothing(engine: DiffusionEngine, lora_dir: Path, tmp_path: Path) -> None:
    """A LoRA for another model (one layer of another width here) is refused
    before any weight is touched, although its other layers fit."""
    state = load_file(lora_dir / "detail" / "pytorch_lora_weights.safetensors")
    key = max(k for k in state if k.endswith("attn2.to_k.lora.down.weight"))
    state[key] = torch.randn(state[key].shape[0], 48)
    (tmp_path / "loras" / "wide").mkdir(parents=True)
    save_file(state, tmp_path / "loras" / "wide" / "wide.safetensors")
    library = LoraLibrary(LoraCatalog(tmp_path / "loras"))
    engine.loras.use(())
    base = weights(engine.unet)
    with pytest.raises(GenerationError, match="does not fit"):
        engine.loras.merger.activate([(library.get("wide"), 1.0)])
    assert all(torch.equal(a, b) for a, b in zip(base, weights(engine.unet)))
    assert engine.loras.merger.active == ()


def test_library_reads_a_replaced_file_again(tiny_model: Path, tmp_path: Path) -> None:
    root = tmp_path / "loras"
    path = write_lora(tiny_model, root / "one", seed=7, text_rank=None)
    library = LoraLibrary(LoraCatalog(root), capacity=1)
    first = library.get("one")
    assert library.get("one") is first and library.loads == 1
    write_lora(tiny_model, root / "one", seed=8, text_rank=None)
    os.utime(path, ns=(1, first.stamp[1] + 1))
    assert library.get("one") is not first and library.loads == 2
