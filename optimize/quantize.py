"""INT8 SmoothQuant and FP8 quantization of the UNet with NVIDIA ModelOpt.

``mtq.quantize`` inserts fake quantizers (quantize-dequantize in PyTorch) into
the UNet's linear and convolution layers and calibrates them by replaying the
recorded calibration inputs (``calibration.CalibrationSet.replay``). The
quantized UNet runs in plain PyTorch, on the CPU too, so its image quality can
be measured before any TensorRT engine exists; exported to ONNX it carries
explicit Q/DQ nodes, which is how TensorRT 10+ takes INT8/FP8 (strongly typed,
no implicit calibration).

Layers left in high precision follow NVIDIA's published diffusers recipe
(ModelOpt's ``examples/diffusers/quantization``: after quantizing it disables
the quantizers of the layers its default filter names). In SD1.5's UNet those
are the timestep embedding MLP (``time_embedding``) and every ResNet's
projection of it (``time_emb_proj``), the first and last convolutions
(``conv_in``, ``conv_out``) and the 1x1 residual shortcuts (``conv_shortcut``).
The filter also names layers of other backbones (SDXL's ``add_embedding``, and
DiT layers such as ``pos_embed``, ``time_text_embed``, ``context_embedder``,
``norm_out``, ``x_embedder``); they are kept so the same rule holds for them.
We disable them both in the config (so SmoothQuant does not rescale them) and
afterwards with ``mtq.disable_quantizer``, as the recipe does.

ModelOpt is imported lazily (its first import takes seconds).
"""
from __future__ import annotations

import copy
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from optimize.choices import RECIPES

if TYPE_CHECKING:
    from optimize.calibration import CalibrationSet


SKIPPED_LAYERS: tuple[str, ...] = (
    "time_embedding", "time_emb_proj", "conv_in", "conv_out", "conv_shortcut",
    "add_embedding", "pos_embed", "time_text_embed", "context_embedder", "norm_out", "x_embedder",
)

# ModelOpt's name for the precision of the Q/DQ scales in an exported graph.
HIGH_PRECISION: dict[torch.dtype, str] = {
    torch.float32: "Float", torch.float16: "Half", torch.bfloat16: "BFloat16",
}


def is_skipped(name: str) -> bool:
    """True for a module or quantizer name inside a layer the recipe keeps unquantized."""
    return any(part in SKIPPED_LAYERS for part in name.split("."))


def recipe_config(recipe: str, *, alpha: float = 1.0, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """ModelOpt's INT8 SmoothQuant or FP8 preset plus the skip list.

    ``alpha`` is SmoothQuant's migration strength (1.0 as in the recipe's default);
    ``dtype`` is the precision the Q/DQ scales get in an exported graph.
    """
    import modelopt.torch.quantization as mtq

    if recipe == "int8":
        config = copy.deepcopy(mtq.INT8_SMOOTHQUANT_CFG)
        config["algorithm"] = {"method": "smoothquant", "alpha": alpha}
    elif recipe == "fp8":
        config = copy.deepcopy(mtq.FP8_DEFAULT_CFG)
    else:
        raise ValueError(f"unknown recipe {recipe!r}; expected one of {RECIPES}")
    entries = config["quant_cfg"]
    # ModelOpt releases spell quant_cfg as a list of entries (newer) or a pattern -> attributes dict.
    attrs = [e.get("cfg") for e in entries] if isinstance(entries, list) else list(entries.values())
    for cfg in attrs:
        if isinstance(cfg, dict) and "num_bits" in cfg:
            cfg["trt_high_precision_dtype"] = HIGH_PRECISION[dtype]
    # Later entries win: these switch the skipped layers' quantizers off.
    for name in SKIPPED_LAYERS:
        if isinstance(entries, list):
            entries.append({"quantizer_name": f"*{name}.*", "enable": False})
        else:
            entries[f"*{name}.*"] = {"enable": False}
    return config


def quantizers(module: torch.nn.Module) -> Iterator[tuple[str, Any]]:
    """(name, quantizer) of every ModelOpt TensorQuantizer in ``module``."""
    for name, sub in module.named_modules():
        if name.endswith("_quantizer") and hasattr(sub, "is_enabled"):
            yield name, sub


@dataclass(frozen=True)
class QuantReport:
    recipe: str
    enabled: int
    disabled: int
    skipped_layers: tuple[str, ...]  # modules whose quantizers the skip list switched off
    calibration_calls: int


def _module_dtype(module: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next(module.parameters())
    return p.device, p.dtype


def quantize_unet(unet: torch.nn.Module, calibration: CalibrationSet, recipe: str, *, alpha: float = 1.0,
                  limit: int | None = None) -> QuantReport:
    """Quantize ``unet`` in place (fake quant) and calibrate it on ``calibration``.

    ``limit`` caps the replayed calibration calls (None: all of them).
    """
    import modelopt.torch.quantization as mtq

    device, dtype = _module_dtype(unet)
    config = recipe_config(recipe, alpha=alpha, dtype=dtype)
    calls = min(len(calibration), limit) if limit is not None else len(calibration)
    if calls == 0:
        raise ValueError("the calibration set is empty")
    unet.eval()
    with warnings.catch_warnings():
        # SmoothQuant notes each skipped layer as "not calibrated": that is the skip list working.
        warnings.filterwarnings("ignore", message=".*is not calibrated, skip smoothing")
        mtq.quantize(unet, config, lambda model: calibration.replay(model, device, dtype, limit=limit))
    mtq.disable_quantizer(unet, is_skipped)
    states = dict(quantizers(unet))
    skipped = sorted({name.rsplit(".", 1)[0] for name in states if is_skipped(name)})
    enabled = sum(1 for q in states.values() if q.is_enabled)
    return QuantReport(recipe=recipe, enabled=enabled, disabled=len(states) - enabled,
                       skipped_layers=tuple(skipped), calibration_calls=calls)


def save_state(unet: torch.nn.Module, path: Path) -> None:
    """ModelOpt's own checkpoint: quantizer layout, scales and (smoothed) weights."""
    import modelopt.torch.opt as mto

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    mto.save(unet, str(path))


def restore_state(unet: torch.nn.Module, path: Path) -> torch.nn.Module:
    """Turn a freshly loaded fp UNet into the saved quantized one (in place)."""
    import modelopt.torch.opt as mto

    restored = mto.restore(unet, str(path))
    restored.eval()
    return restored


def fp8_fake_quant_available(device: str | torch.device = "cpu") -> tuple[bool, str]:
    """Whether ModelOpt's FP8 fake quantization runs on ``device`` here; else why not."""
    try:
        from modelopt.torch.quantization.nn import TensorQuantizer
        from modelopt.torch.quantization.config import QuantizerAttributeConfig

        q = TensorQuantizer(QuantizerAttributeConfig(num_bits=(4, 3), axis=None)).to(device)
        x = torch.linspace(-3, 3, 64, device=device)
        q.amax = x.abs().max()
        y = q(x)
        if not torch.isfinite(y).all():
            return False, "FP8 fake quantization returned non-finite values"
        return True, ""
    except Exception as exc:  # any failure means "not here"; report it
        return False, f"FP8 fake quantization is not available on {device}: {type(exc).__name__}: {exc}"
