"""Named LoRAs on disk: which names exist and which file holds each one.

``lora_dir`` holds one subfolder per LoRA, named like the LoRA, with its
``.safetensors`` file inside. This module only looks at the folder (no torch),
so the API can check a request's names before queueing it; the worker's
engine reads the weights (``imagegenx.engine.lora``).
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from imagegenx.errors import BatchSetupError
from imagegenx.schemas import LORA_NAME

# The file name diffusers' save_lora_weights writes; preferred when a folder holds several.
DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"


class LoraNotFound(BatchSetupError):
    """A requested LoRA name has no weights file in lora_dir."""


@dataclass(frozen=True)
class LoraCatalog:
    root: Path

    def exists(self) -> bool:
        return self.root.is_dir()

    def names(self) -> list[str]:
        """Names of the subfolders that hold a .safetensors file, sorted."""
        if not self.exists():
            return []
        return sorted(p.name for p in self.root.iterdir()
                      if LORA_NAME.fullmatch(p.name) and p.is_dir() and _candidates(p))

    def weights_file(self, name: str) -> Path:
        """The LoRA's weights file; LoraNotFound when there is none (or no single one)."""
        folder = self.root / name
        files = _candidates(folder) if LORA_NAME.fullmatch(name) and folder.is_dir() else []
        if not files:
            raise LoraNotFound(self.unknown_reason([name]) or f"LoRA {name!r} not found")
        if len(files) > 1:
            preferred = folder / DIFFUSERS_FILE
            if preferred in files:
                return preferred
            raise LoraNotFound(f"LoRA {name!r}: {folder} holds several .safetensors files "
                               f"({', '.join(f.name for f in files)}); keep one or name it {DIFFUSERS_FILE}")
        return files[0]

    def unknown_reason(self, names: Iterable[str]) -> str | None:
        """Why some of ``names`` cannot be used (naming the available ones), or None.

        Looks at the folder only when a name is asked for; an unreadable folder
        is a reason too (LoraNotFound, not an OSError, reaches the caller).
        """
        names = list(names)
        if not names:
            return None
        try:
            available = self.names()
        except OSError as exc:
            return f"cannot read lora_dir {self.root}: {exc.strerror or exc}"
        missing = [n for n in names if n not in available]
        if not missing:
            return None
        quoted = ", ".join(repr(n) for n in missing)
        if not self.exists():
            return f"unknown LoRA {quoted}: no LoRA is available (lora_dir {self.root} does not exist)"
        listed = ", ".join(available) if available else "none"
        return f"unknown LoRA {quoted} in lora_dir {self.root}; available: {listed}"

    def require(self, names: Iterable[str]) -> None:
        """Raise LoraNotFound unless every name is available."""
        reason = self.unknown_reason(names)
        if reason is not None:
            raise LoraNotFound(reason)


def _candidates(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("*.safetensors") if p.is_file())
