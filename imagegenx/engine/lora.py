"""Named LoRAs merged into the served model's weights, in place.

The GPU fast path compiles the UNet and captures CUDA graphs over its weight
tensors, so a LoRA must neither add layers nor replace tensors (the graphs
would have to be captured again). Instead each LoRA's low-rank update
``weight * scale * up @ down`` is added INTO the existing weights (same
storage, same addresses), after a backup copy of every weight it touches.
Switching to another set first copies the backups back, so the base weights
return bit-exactly; a batch whose set is already merged costs nothing.

Files are read with diffusers' ``StableDiffusionLoraLoaderMixin.lora_state_dict``
(the diffusers/peft layout and kohya/A1111 files), and diffusers' own key
converters bring both to peft's ``<module>.lora_A`` / ``lora_B`` names.
"""
from __future__ import annotations

import math
import re
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from imagegenx.errors import BatchSetupError
from imagegenx.lora_catalog import LoraCatalog, LoraNotFound

COMPONENTS = ("unet", "text_encoder")
# Fused projections (fastpath.optimise_modules): the fused layer and the layers it concatenates.
FUSED = {"to_qkv": ("to_q", "to_k", "to_v"), "to_kv": ("to_k", "to_v")}

LoraSet = tuple[tuple[str, float], ...]


class LoraError(BatchSetupError):
    """A LoRA file that cannot be read or does not fit the served model."""


@dataclass(frozen=True)
class LoraLayer:
    """One low-rank update: ``scale * up @ down`` added to ``component.module.weight``."""

    component: str
    module: str
    down: torch.Tensor  # lora_A: (rank, in[, kh, kw])
    up: torch.Tensor  # lora_B: (out, rank[, 1, 1])
    scale: float  # alpha / rank (alpha / sqrt(rank) for rank-stabilised LoRA)

    def delta(self, device: torch.device, strength: float = 1.0) -> torch.Tensor:
        """``strength * scale * up @ down`` in fp32, flattened to (out, in * kh * kw)."""
        up = self.up.to(device=device, dtype=torch.float32).flatten(1)
        down = self.down.to(device=device, dtype=torch.float32).flatten(1)
        return (up @ down) * (self.scale * strength)


@dataclass(frozen=True)
class LoadedLora:
    name: str
    stamp: tuple[str, int, int]  # (file, mtime_ns, size): a replaced file is read again
    layers: tuple[LoraLayer, ...]

    @property
    def touches_text_encoder(self) -> bool:
        return any(layer.component == "text_encoder" for layer in self.layers)


# -- reading files ---------------------------------------------------------------


def read_lora_file(path: Path, name: str) -> tuple[LoraLayer, ...]:
    """The layers of one LoRA file, diffusers or kohya layout."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin

    try:
        read = StableDiffusionLoraLoaderMixin.lora_state_dict(
            str(path.parent), weight_name=path.name, local_files_only=True, return_lora_metadata=True,
        )
        # diffusers before 0.34 keeps no adapter metadata and returns two values.
        state_dict, alphas, metadata = read if len(read) == 3 else (*read, None)
    except Exception as exc:  # noqa: BLE001 - any reader error means an unusable file
        raise LoraError(f"LoRA {name!r}: cannot read {path.name}: {type(exc).__name__}: {exc}") from exc
    unknown = sorted({key.split(".", 1)[0] for key in state_dict} - set(COMPONENTS))
    if unknown:
        raise LoraError(f"LoRA {name!r} has weights for {', '.join(unknown)}, which this model "
                        "(UNet and one text encoder) does not have")
    layers: list[LoraLayer] = []
    for component in COMPONENTS:
        tensors = _strip(state_dict, component)
        if tensors:
            layers += _component_layers(name, component, tensors, _strip(alphas or {}, component),
                                        _strip(metadata or {}, component))
    if not layers:
        raise LoraError(f"LoRA {name!r}: {path.name} holds no LoRA weights")
    return tuple(layers)


def _strip(mapping: Mapping[str, Any], component: str) -> dict[str, Any]:
    prefix = component + "."
    return {k[len(prefix):]: v for k, v in mapping.items() if k.startswith(prefix)}


def _to_peft_keys(component: str, entries: dict[str, Any]) -> dict[str, Any]:
    """diffusers' own conversions to peft names, as its loaders apply them."""
    from diffusers.utils.state_dict_utils import (
        convert_state_dict_to_diffusers,
        convert_state_dict_to_peft,
        convert_unet_state_dict_to_peft,
    )

    if component == "unet":
        return entries if any("lora_A" in k for k in entries) else convert_unet_state_dict_to_peft(entries)
    return convert_state_dict_to_peft(convert_state_dict_to_diffusers(entries))


def _component_layers(name: str, component: str, tensors: dict[str, torch.Tensor],
                      alphas: dict[str, float], metadata: dict[str, Any]) -> list[LoraLayer]:
    # kohya alphas are named after the down weight + ".alpha": converted with the
    # weights, so they end up named after the same module.
    try:
        converted = _to_peft_keys(component, {**tensors, **alphas})
    except ValueError as exc:  # a key layout diffusers does not know
        raise LoraError(f"LoRA {name!r}: unrecognised {component} weights: {exc}") from exc
    module_alpha = {k[:-len(".alpha")].split(".lora_A")[0]: float(v)
                    for k, v in converted.items() if k.endswith(".alpha")}
    weights = {k: v for k, v in converted.items() if not k.endswith(".alpha")}
    unsupported = [k for k in weights if not k.endswith((".lora_A.weight", ".lora_B.weight"))]
    if unsupported:
        kind = "DoRA" if any("magnitude" in k for k in unsupported) else "these"
        raise LoraError(f"LoRA {name!r}: {kind} weights are not supported ({unsupported[0]}, ...)")
    if metadata.get("use_dora"):
        raise LoraError(f"LoRA {name!r}: DoRA is not supported")
    layers = []
    for key in sorted(k for k in weights if k.endswith(".lora_A.weight")):
        module = key[:-len(".lora_A.weight")]
        up = weights.get(f"{module}.lora_B.weight")
        if up is None:
            raise LoraError(f"LoRA {name!r}: {component}.{module} has lora_A but no lora_B")
        down = weights[key]
        rank = down.shape[0]
        if up.ndim < 2 or up.shape[1] != rank or (up.ndim == 4 and tuple(up.shape[2:]) != (1, 1)):
            raise LoraError(f"LoRA {name!r}: {component}.{module} has up/down weights of shapes "
                            f"{tuple(up.shape)} and {tuple(down.shape)}, which do not chain")
        alpha = module_alpha.get(module)
        if alpha is None:
            alpha = _pattern_value(metadata.get("alpha_pattern") or {}, module,
                                   metadata.get("lora_alpha", rank))
        divisor = math.sqrt(rank) if metadata.get("use_rslora") else rank
        layers.append(LoraLayer(component, module, down, up, float(alpha) / divisor))
    unpaired = [k for k in weights if k.endswith(".lora_B.weight")
                and k.replace(".lora_B.", ".lora_A.") not in weights]
    if unpaired:
        raise LoraError(f"LoRA {name!r}: {component}.{unpaired[0]} has no lora_A")
    return layers


def _pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    """peft's per-module override rule: a pattern matches a dotted suffix of the name."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


# -- the library of named LoRAs ---------------------------------------------------


class LoraLibrary:
    """Loads named LoRAs from a catalog, keeping the most recent few in memory (CPU)."""

    def __init__(self, catalog: LoraCatalog, capacity: int = 8) -> None:
        self.catalog = catalog
        self.capacity = capacity
        self._cache: OrderedDict[str, LoadedLora] = OrderedDict()
        self._lock = threading.Lock()
        self.loads = 0

    def get(self, name: str) -> LoadedLora:
        path = self.catalog.weights_file(name)
        st = path.stat()
        stamp = (str(path), st.st_mtime_ns, st.st_size)
        with self._lock:
            cached = self._cache.get(name)
            if cached is not None and cached.stamp == stamp:
                self._cache.move_to_end(name)
                return cached
        loaded = LoadedLora(name, stamp, read_lora_file(path, name))
        with self._lock:
            self.loads += 1
            self._cache[name] = loaded
            self._cache.move_to_end(name)
            while len(self._cache) > self.capacity:
                self._cache.popitem(last=False)
        return loaded


# -- merging into the model --------------------------------------------------------


class LoraMerger:
    """Merges a set of LoRAs into modules' weights in place and takes it out again."""

    def __init__(self, modules: Mapping[str, torch.nn.Module]) -> None:
        self.modules = dict(modules)
        self._backups: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id -> (weight, original)
        self._active: tuple[tuple[str, tuple[str, int, int], float], ...] = ()
        self._lock = threading.Lock()
        # The merged LoRAs that change prompt embeddings (part of the prompt cache key).
        self.text_scope: tuple[tuple[str, tuple[str, int, int], float], ...] = ()

    @property
    def active(self) -> LoraSet:
        return tuple((name, weight) for name, _, weight in self._active)

    def activate(self, loras: Sequence[tuple[LoadedLora, float]]) -> bool:
        """Make ``loras`` (each with its weight) the merged set; False if it already was."""
        chosen = [(lora, float(w)) for lora, w in loras if w != 0]
        ident = tuple((lora.name, lora.stamp, w) for lora, w in chosen)
        with self._lock, torch.no_grad():
            if ident == self._active:
                return False
            self._restore()
            try:
                self._merge(chosen)
            except BaseException:
                self._restore()
                raise
            self._active = ident
            self.text_scope = tuple(entry for entry, (lora, _) in zip(ident, chosen)
                                    if lora.touches_text_encoder)
            return True

    def _restore(self) -> None:
        """Copy every touched weight back from its backup (bit-exact), drop the backups."""
        for weight, original in self._backups.values():
            weight.copy_(original)
        self._backups.clear()
        self._active = ()
        self.text_scope = ()

    def _merge(self, loras: Sequence[tuple[LoadedLora, float]]) -> None:
        # Resolve and check every target first, so a LoRA that does not fit
        # changes nothing; then sum each weight's updates in fp32 and add once.
        plan: dict[int, tuple[torch.Tensor, list[tuple[int, LoraLayer, float]]]] = {}
        for lora, strength in loras:
            for layer in lora.layers:
                for weight, row in self._targets(lora.name, layer):
                    plan.setdefault(id(weight), (weight, []))[1].append((row, layer, strength))
        for weight, parts in plan.values():
            total = torch.zeros((weight.shape[0], weight[0].numel()), dtype=torch.float32, device=weight.device)
            for row, layer, strength in parts:
                total[row:row + layer.up.shape[0]] += layer.delta(weight.device, strength)
            self._backups[id(weight)] = (weight, weight.detach().clone())
            weight.add_(total.view(weight.shape))

    def _targets(self, lora: str, layer: LoraLayer) -> list[tuple[torch.Tensor, int]]:
        """(weight, first row) of every tensor the layer's update goes into: the
        layer's own weight and, where projections were fused, its rows of the fused one."""
        root = self.modules.get(layer.component)
        found = _find_module(root, layer.module) if root is not None else None
        if root is None or found is None:
            raise LoraError(f"LoRA {lora!r} targets {layer.component}.{layer.module}, "
                            "which this model does not have")
        path, module = found
        weight = getattr(module, "weight", None)
        rows, cols = layer.up.shape[0], layer.down[0].numel()
        if not isinstance(weight, torch.Tensor) or weight.shape[0] != rows or weight[0].numel() != cols:
            shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else None
            raise LoraError(f"LoRA {lora!r} does not fit {layer.component}.{path}: update of "
                            f"{rows}x{cols}, weight of shape {shape}")
        targets = [(weight, 0)]
        parent_path, _, leaf = path.rpartition(".")
        parent = root.get_submodule(parent_path)
        if getattr(parent, "fused_projections", False):
            for fused, parts in FUSED.items():
                fused_layer = getattr(parent, fused, None)
                if fused_layer is not None and leaf in parts:
                    offset = sum(getattr(parent, p).weight.shape[0] for p in parts[:parts.index(leaf)])
                    targets.append((fused_layer.weight, offset))
        return targets


def _find_module(root: torch.nn.Module, name: str) -> tuple[str, torch.nn.Module] | None:
    """The module called ``name``; text encoder names may come with or without ``text_model.``."""
    for candidate in (name, name.removeprefix("text_model."), f"text_model.{name}"):
        try:
            return candidate, root.get_submodule(candidate)
        except AttributeError:
            continue
    return None


# -- what the engine uses ------------------------------------------------------------


class EngineLoras:
    """The engine's LoRA state: named LoRAs from ``lora_dir``, merged per batch."""

    def __init__(self, lora_dir: Path | str | None, **modules: torch.nn.Module) -> None:
        self.catalog = LoraCatalog(Path(lora_dir)) if lora_dir is not None else None
        self.library = LoraLibrary(self.catalog) if self.catalog is not None else None
        self.merger = LoraMerger(modules)

    def use(self, loras: LoraSet) -> bool:
        """Merge the batch's set (names and weights) unless it is already merged."""
        wanted = [(name, w) for name, w in loras if w != 0]
        if not wanted:
            return self.merger.activate([])
        if self.library is None:
            raise LoraNotFound("this engine has no lora_dir: LoRAs are not available")
        try:
            return self.merger.activate([(self.library.get(name), w) for name, w in wanted])
        except torch.OutOfMemoryError as exc:  # the merger has restored the base weights
            exc.__traceback__ = None  # its frames hold the deltas being merged
            raise LoraError(f"out of memory merging LoRAs {[n for n, _ in wanted]}: {exc}") from None

    @property
    def text_scope(self) -> tuple[Any, ...]:
        """Key part for prompt embeddings: the merged LoRAs that change the text encoder."""
        return self.merger.text_scope
