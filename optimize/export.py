"""ONNX export of the engine's three networks with a dynamic batch axis.

Each network is wrapped so that its graph has plain tensor inputs and one
output, named as TensorRT profiles and the onnxruntime check refer to them:

- ``unet``: (sample, timestep, encoder_hidden_states) -> noise_pred. The engine
  runs it with classifier-free guidance, so its batch is 2 x images; the
  timestep carries the batch axis too (one value per row).
- ``vae_decoder``: latent (already divided by the VAE scaling factor) -> image.
- ``text_encoder``: input_ids (77 CLIP tokens) -> last_hidden_state.

Only the batch axis is dynamic: the worker runs the UNet at the model's native
latent size, which is also the only size its CUDA graphs and TensorRT profiles
cover.

Two exporters: torch's ``dynamo`` exporter (``torch.export`` plus onnxscript, the
maintained path) and the TorchScript exporter. ``auto`` tries dynamo and falls
back to TorchScript. Quantized UNets always go through TorchScript, because
ModelOpt emits its Q/DQ nodes from TorchScript symbolic functions. Models whose
weights pass protobuf's 2 GB limit (the fp32 SD1.5 UNet: 3.4 GB) are written
with their weights in one external ``<name>.onnx.data`` file next to the graph.
"""
from __future__ import annotations

import logging
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch

from optimize.choices import COMPONENTS, EXPORTERS

if TYPE_CHECKING:
    from imagegenx.engine.diffusion import DiffusionEngine

log = logging.getLogger(__name__)

Exporter = Literal["auto", "dynamo", "torchscript"]

# protobuf cannot serialise a message of 2 GiB or more; keep room for the graph itself.
PROTOBUF_LIMIT = 2 * 1024**3
EXTERNAL_DATA_THRESHOLD = PROTOBUF_LIMIT - 128 * 1024**2
EXPORT_BATCH = 2  # rows of the example inputs; checks then run at other sizes
DEFAULT_OPSET = {"dynamo": 18, "torchscript": 17}


@dataclass(frozen=True)
class ComponentSpec:
    """Names of a component's graph inputs and output."""

    inputs: tuple[str, ...]
    output: str


SPECS: dict[str, ComponentSpec] = {
    "unet": ComponentSpec(("sample", "timestep", "encoder_hidden_states"), "noise_pred"),
    "vae_decoder": ComponentSpec(("latent",), "image"),
    "text_encoder": ComponentSpec(("input_ids",), "last_hidden_state"),
}


@dataclass(frozen=True)
class ExportResult:
    component: str
    path: Path
    exporter: str
    external_data: bool
    bytes: int


class UNetGraph(torch.nn.Module):
    """UNet with positional inputs and a plain tensor output."""

    def __init__(self, unet: torch.nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor,
                encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]


class VaeDecoderGraph(torch.nn.Module):
    """``vae.decode`` alone; the engine divides by the scaling factor before it."""

    def __init__(self, vae: torch.nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latent, return_dict=False)[0]


class TextEncoderGraph(torch.nn.Module):
    """CLIP text tower returning the last hidden state the UNet is conditioned on."""

    def __init__(self, text_encoder: torch.nn.Module) -> None:
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.text_encoder(input_ids, return_dict=False)[0]


def graph_module(component: str, engine: DiffusionEngine) -> torch.nn.Module:
    """The engine's network for ``component``, wrapped for export."""
    if component == "unet":
        return UNetGraph(engine.unet).eval()
    if component == "vae_decoder":
        return VaeDecoderGraph(engine.vae).eval()
    if component == "text_encoder":
        return TextEncoderGraph(engine.text_encoder).eval()
    raise ValueError(f"unknown component {component!r}; expected one of {COMPONENTS}")


def example_inputs(component: str, engine: DiffusionEngine, batch: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Inputs of realistic range for ``batch`` rows: real prompts through the real
    tokenizer and text encoder, timesteps across the training schedule."""
    from optimize.calibration import load_prompts

    g = torch.Generator().manual_seed(seed)
    prompts = load_prompts()
    picked = [prompts[(seed + i) % len(prompts)] for i in range(batch)]
    dev, dtype = engine.device, engine.dtype
    width, height = engine.native_size
    f = engine.vae_scale_factor
    if component == "text_encoder":
        ids = engine.tokenizer(picked, padding="max_length", max_length=engine.tokenizer.model_max_length,
                               truncation=True, return_tensors="pt").input_ids
        return (ids.to(dev),)
    latent_shape = (batch, engine.unet.config.in_channels, height // f, width // f)
    if component == "vae_decoder":
        latent = torch.randn(latent_shape, generator=g) / engine.vae.config.scaling_factor
        return (latent.to(dev, dtype),)
    if component == "unet":
        sample = torch.randn(latent_shape, generator=g)
        timestep = torch.randint(1, 1000, (batch,), generator=g).float()
        context = torch.cat([engine.prompt_cache.get(p) for p in picked])
        return sample.to(dev, dtype), timestep.to(dev), context.to(dev, dtype)
    raise ValueError(f"unknown component {component!r}; expected one of {COMPONENTS}")


def weight_bytes(module: torch.nn.Module) -> int:
    """Bytes of parameters and buffers: what ends up as ONNX initializers."""
    tensors = list(module.parameters()) + list(module.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def needs_external_data(nbytes: int) -> bool:
    """Weights this large cannot live inside one protobuf message."""
    return nbytes >= EXTERNAL_DATA_THRESHOLD


def is_quantized(module: torch.nn.Module) -> bool:
    """True when ModelOpt has inserted quantizers (its modules carry them)."""
    return any(hasattr(m, "input_quantizer") for m in module.modules())


def _clear_outputs(path: Path) -> None:
    for stale in (path, path.with_name(path.name + ".data")):
        stale.unlink(missing_ok=True)


def _save_proto(model: object, path: Path, external: bool) -> None:
    import onnx

    _clear_outputs(path)
    if external:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data", size_threshold=1024)
    else:
        onnx.save_model(model, str(path))


def _export_dynamo(module: torch.nn.Module, args: tuple[torch.Tensor, ...], path: Path, spec: ComponentSpec,
                   opset: int, external: bool) -> None:
    batch = torch.export.Dim("batch", min=1, max=4096)
    registry_log = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registry_log.level
    registry_log.setLevel(logging.ERROR)  # "torchvision is not installed" notices, irrelevant here
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            program = torch.onnx.export(
                module, args, dynamo=True, dynamic_shapes=tuple({0: batch} for _ in args),
                input_names=list(spec.inputs), output_names=[spec.output], opset_version=opset, verbose=False,
            )
    finally:
        registry_log.setLevel(level)
    _clear_outputs(path)
    program.save(str(path), external_data=external)


def _export_torchscript(module: torch.nn.Module, args: tuple[torch.Tensor, ...], path: Path,
                        spec: ComponentSpec, opset: int, external: bool) -> None:
    import onnx

    axes = {name: {0: "batch"} for name in (*spec.inputs, spec.output)}
    # Export into a scratch folder: past 2 GB the TorchScript exporter writes one
    # file per weight; re-saving gathers them into a single .data file.
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".export-") as tmp:
        scratch = Path(tmp) / path.name
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings about Python control flow on shapes
            torch.onnx.export(module, args, str(scratch), dynamo=False, input_names=list(spec.inputs),
                              output_names=[spec.output], dynamic_axes=axes, opset_version=opset,
                              do_constant_folding=True)
        _save_proto(onnx.load(str(scratch)), path, external)


def export_module(module: torch.nn.Module, args: tuple[torch.Tensor, ...], path: Path, spec: ComponentSpec, *,
                  exporter: Exporter = "auto", opset: int | None = None,
                  external_data: bool | None = None) -> tuple[str, bool]:
    """Export ``module`` to ``path``; returns (exporter used, external data written).

    ``external_data`` None decides by weight size (see ``needs_external_data``).
    """
    if exporter not in EXPORTERS:
        raise ValueError(f"unknown exporter {exporter!r}; expected one of {EXPORTERS}")
    quantized = is_quantized(module)
    if quantized and exporter == "dynamo":
        raise ValueError("a quantized UNet exports with the TorchScript exporter only "
                         "(ModelOpt's Q/DQ nodes come from TorchScript symbolic functions)")
    external = needs_external_data(weight_bytes(module)) if external_data is None else external_data
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    order = ["torchscript"] if quantized or exporter == "torchscript" else ["dynamo"]
    if exporter == "auto" and not quantized:
        order.append("torchscript")
    with torch.no_grad():
        for i, name in enumerate(order):
            version = opset or DEFAULT_OPSET[name]
            try:
                if name == "dynamo":
                    _export_dynamo(module, args, path, spec, version, external)
                else:
                    _export_torchscript(module, args, path, spec, version, external)
                # The dynamo exporter also moves weights out past its own size limit.
                return name, path.with_name(path.name + ".data").exists()
            except Exception as exc:  # the dynamo exporter fails in many ways; say why and fall back
                if i + 1 == len(order):
                    raise
                log.warning("%s export of %s failed (%s: %s); trying %s", name, path.name,
                            type(exc).__name__, exc, order[i + 1])
    raise AssertionError("unreachable")


def onnx_bytes(path: Path) -> int:
    """Size of the graph file plus its external data, if any."""
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def export_components(engine: DiffusionEngine, out_dir: Path, components: Sequence[str] = COMPONENTS, *,
                      exporter: Exporter = "auto", opset: int | None = None,
                      external_data: bool | None = None, suffix: str = "") -> list[ExportResult]:
    """Export each of ``components`` of ``engine`` to ``out_dir/<component><suffix>.onnx``."""
    results = []
    for component in components:
        module = graph_module(component, engine)
        args = example_inputs(component, engine, EXPORT_BATCH)
        path = Path(out_dir) / f"{component}{suffix}.onnx"
        used, external = export_module(module, args, path, SPECS[component], exporter=exporter, opset=opset,
                                       external_data=external_data)
        results.append(ExportResult(component, path, used, external, onnx_bytes(path)))
    return results
