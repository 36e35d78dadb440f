"""Serve an original-layout single-file checkpoint (e.g. v1-5-pruned-emaonly.safetensors).

Such a file holds weights only. diffusers' single-file support converts them,
building each module from a local folder of component configs (``configs/sd15``
by default), so nothing is fetched from a model hub. diffusers does not fail on
a checkpoint that lacks weights: it leaves them uninitialised. So the file's
names and shapes are checked against the config first, from the safetensors
header alone, and every failure becomes a one-line :class:`ModelLoadError` that
the worker logs at startup.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from imagegenx.engine.ldm_layout import PREFIXES, to_ldm
from imagegenx.engine.tokenizer import MAX_LENGTH, load_clip_tokenizer, write_clip_tokenizer

if TYPE_CHECKING:
    from imagegenx.engine.diffusion import DiffusionEngine
    from imagegenx.engine.fastpath import FastPathOptions

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG_DIR = Path("configs/sd15")
# Suffixes taken to name a checkpoint file rather than a model folder.
CHECKPOINT_SUFFIXES = frozenset({".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".sft"})
CONFIG_FILES = (
    "unet/config.json",
    "vae/config.json",
    "text_encoder/config.json",
    "scheduler/scheduler_config.json",
)
_COMPONENT_NAMES = {"unet": "UNet", "vae": "VAE", "text_encoder": "text encoder"}


class ModelLoadError(ValueError):
    """The configured model cannot be loaded; the one-line message says why."""


def is_single_file(path: Path) -> bool:
    """Whether ``path`` names a checkpoint file (existing or not) rather than a folder."""
    path = Path(path)
    return path.is_file() or path.suffix.lower() in CHECKPOINT_SUFFIXES


def check_single_file(path: Path) -> Path:
    """Return ``path`` if it is an existing ``.safetensors`` file, else raise ModelLoadError."""
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise ModelLoadError(
            f"IMAGEGENX_MODEL: {path} is not a .safetensors file; only safetensors single-file "
            "checkpoints are loaded (pickled .ckpt files can run code: convert them first)"
        )
    if not path.is_file():
        raise ModelLoadError(f"IMAGEGENX_MODEL: checkpoint {path} does not exist")
    return path


def resolve_config_dir(path: Path | str = DEFAULT_CONFIG_DIR) -> Path:
    """The component config folder: ``path``, or a relative ``path`` under the repository root.

    The fallback lets the default ``configs/sd15`` work from any working directory.
    """
    path = Path(path)
    candidates = [path] if path.is_absolute() else [path, REPO_ROOT / path]
    for folder in candidates:
        if all((folder / rel).is_file() for rel in CONFIG_FILES):
            return folder
    tried = " or ".join(str(c.resolve()) for c in candidates)
    raise ModelLoadError(
        f"IMAGEGENX_MODEL_CONFIG_DIR: {path} is not a folder of SD component configs "
        f"(needs {', '.join(CONFIG_FILES)}; looked in {tried})"
    )


def expected_shapes(config_dir: Path) -> dict[str, tuple[int, ...]]:
    """Original-layout weight name -> shape, for the modules the configs describe.

    The modules are built on the meta device: no memory, no weights.
    """
    where: dict[str, Any] = {"pretrained_model_name_or_path": str(config_dir), "local_files_only": True}
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(**where, subfolder="unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(**where, subfolder="vae"))
        text = CLIPTextModel(CLIPTextConfig.from_pretrained(**where, subfolder="text_encoder"))
    names = to_ldm(unet.state_dict(), vae.state_dict(), text.state_dict(), unet.config, vae.config)
    return {key: tuple(t.shape) for key, t in names.items()}


def _same_shape(found: tuple[int, ...], wanted: tuple[int, ...]) -> bool:
    """Equal up to trailing 1s: some files keep the VAE attention as linear, not 1x1 conv."""
    def trim(shape: tuple[int, ...]) -> tuple[int, ...]:
        while shape and shape[-1] == 1 and len(shape) > 1:
            shape = shape[:-1]
        return shape
    return found == wanted or trim(found) == trim(wanted)


def _component(key: str) -> str:
    return next(_COMPONENT_NAMES[name] for name, prefix in PREFIXES.items() if key.startswith(prefix))


def check_checkpoint(path: Path, config_dir: Path) -> None:
    """Raise ModelLoadError unless the file holds every weight the configs need, in their shapes."""
    from safetensors import SafetensorError, safe_open

    wanted = expected_shapes(config_dir)
    try:
        with safe_open(str(path), framework="pt") as f:
            found = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    except (SafetensorError, OSError) as exc:
        raise ModelLoadError(f"IMAGEGENX_MODEL: {path} is not a readable safetensors file ({exc})") from None
    missing = [key for key in wanted if key not in found]
    if missing:
        counts = {name: 0 for name in _COMPONENT_NAMES.values()}
        for key in missing:
            counts[_component(key)] += 1
        summary = ", ".join(f"{n} {name}" for name, n in counts.items() if n)
        raise ModelLoadError(
            f"IMAGEGENX_MODEL: {path} lacks {len(missing)} of the {len(wanted)} weights that the configs in "
            f"{config_dir} (IMAGEGENX_MODEL_CONFIG_DIR) need ({summary}; first: {missing[0]}); "
            "expected an original-layout SD checkpoint of that architecture"
        )
    wrong = [key for key in wanted if not _same_shape(found[key], wanted[key])]
    if wrong:
        key = wrong[0]
        raise ModelLoadError(
            f"IMAGEGENX_MODEL: {len(wrong)} weights of {path} do not fit the configs in {config_dir} "
            f"(IMAGEGENX_MODEL_CONFIG_DIR), e.g. {key} has shape {list(found[key])}, "
            f"the config needs {list(wanted[key])}"
        )


def _load_tokenizer(config_dir: Path) -> CLIPTokenizer:
    """The config folder's own tokenizer if it has one, else CLIP's from the vendored vocabulary."""
    if (config_dir / "tokenizer").is_dir():
        tokenizer = CLIPTokenizer.from_pretrained(str(config_dir / "tokenizer"), local_files_only=True)
        tokenizer.model_max_length = min(tokenizer.model_max_length, MAX_LENGTH)
        return tokenizer
    with tempfile.TemporaryDirectory(prefix="imagegenx-tokenizer-") as tmp:
        return load_clip_tokenizer(write_clip_tokenizer(Path(tmp)))


def _assert_loaded(module: torch.nn.Module, component: str, path: Path) -> None:
    """Guard against weights the conversion skipped (left on the meta device)."""
    empty = [name for name, p in module.named_parameters() if p.is_meta]
    if empty:
        raise ModelLoadError(
            f"IMAGEGENX_MODEL: {len(empty)} {component} weights were not filled from {path} (first: {empty[0]})"
        )


def load_components(
    path: Path, config_dir: Path | str = DEFAULT_CONFIG_DIR, dtype: torch.dtype = torch.float32
) -> dict[str, Any]:
    """Load UNet, VAE, text encoder and tokenizer of a single-file checkpoint (CPU).

    Returns the modules with the resolved ``config_dir`` under those names.
    """
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
    from safetensors.torch import load_file

    path = check_single_file(Path(path))
    config_dir = resolve_config_dir(config_dir)
    check_checkpoint(path, config_dir)
    checkpoint = load_file(str(path))  # read once, shared by the three conversions
    common: dict[str, Any] = {"config": str(config_dir), "local_files_only": True}
    loaders = {
        "unet": lambda: UNet2DConditionModel.from_single_file(checkpoint, subfolder="unet", **common),
        "vae": lambda: AutoencoderKL.from_single_file(checkpoint, subfolder="vae", **common),
        "text_encoder": lambda: create_diffusers_clip_model_from_ldm(
            CLIPTextModel, checkpoint, subfolder="text_encoder", **common
        ),
    }
    modules: dict[str, Any] = {"config_dir": config_dir}
    for name, load in loaders.items():
        component = _COMPONENT_NAMES[name]
        try:
            module = load()
        except (KeyError, ValueError, RuntimeError, OSError) as exc:
            detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelLoadError(f"IMAGEGENX_MODEL: cannot load the {component} of {path}: {detail}") from exc
        _assert_loaded(module, component, path)
        # Cast here, not via torch_dtype: diffusers' own cast warns about fp32 modules
        # even when a class has none (UNet and VAE keep nothing in fp32).
        modules[name] = torch.nn.Module.to(module, dtype)
    modules["tokenizer"] = _load_tokenizer(config_dir)
    return modules


def load_single_file_engine(
    path: Path,
    config_dir: Path | str = DEFAULT_CONFIG_DIR,
    device: str = "cpu",
    dtype: str = "fp32",
    *,
    name: str | None = None,
    prompt_cache_size: int = 256,
    fast_path: FastPathOptions | None = None,
    lora_dir: Path | str | None = None,
) -> DiffusionEngine:
    """A DiffusionEngine over a single-file checkpoint; the counterpart of ``DiffusionEngine.load``."""
    from imagegenx.engine.diffusion import DiffusionEngine, torch_dtype_of
    from imagegenx.engine.samplers import load_scheduler_config

    torch_dtype = torch_dtype_of(dtype)
    parts = load_components(path, config_dir, torch_dtype)
    return DiffusionEngine.on_device(
        unet=parts["unet"],
        vae=parts["vae"],
        text_encoder=parts["text_encoder"],
        tokenizer=parts["tokenizer"],
        scheduler_config=load_scheduler_config(parts["config_dir"]),
        device=device,
        dtype=torch_dtype,
        name=name or Path(path).stem,
        prompt_cache_size=prompt_cache_size,
        fast_path=fast_path,
        lora_dir=lora_dir,
    )
