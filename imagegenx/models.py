"""The served models: names, where their weights are, their versions and queues.

Pure logic shared by the API (which model a request names, which queue it goes
to) and the worker (which model it loads, which queue it consumes). One Celery
queue per model keeps a worker from ever receiving a request for a model it
does not hold; the API only routes.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

MODEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
MODEL_NAME = re.compile(MODEL_NAME_PATTERN)


class ModelSpec(BaseModel):
    """One served model. Unset fields take the service-wide settings (engine, lora_dir)."""

    model_config = ConfigDict(extra="forbid")

    path: Path | None = Field(default=None, description="diffusers folder or single-file checkpoint "
                                                        "(none for the synthetic engine)")
    engine: Literal["diffusion", "synthetic"] | None = None
    version: str = Field(default="", max_length=128,
                         description="names the weights in results; empty: derived from the files")
    lora_dir: Path | None = None


def parse_models(value: Any) -> dict[str, ModelSpec]:
    """``IMAGEGENX_MODELS`` as a mapping name -> spec.

    Accepts a JSON object (``{"base": {"path": "...", "version": "v2"}}``), the
    compact text ``base=/models/sd15,anime=/models/anime`` (each name=path), or a
    mapping (the YAML file). A spec may also be a bare path. Order is kept: the
    first model is the default one.
    """
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return {}
        if text.startswith("{"):
            try:
                value = json.loads(text)
            except json.JSONDecodeError as exc:
                raise ValueError(f"models: not valid JSON ({exc.msg} at character {exc.pos})") from None
        else:
            value = _compact(text)
    if not isinstance(value, dict):
        raise ValueError("models must map model names to a path or to {path, engine, version}")
    out: dict[str, ModelSpec] = {}
    for name, spec in value.items():
        name = str(name)
        if not MODEL_NAME.fullmatch(name):
            raise ValueError(f"models: {name!r} is not a model name: 1 to 64 of A-Z a-z 0-9 . _ -, "
                             "starting with a letter or digit")
        if isinstance(spec, (str, Path)):
            spec = {"path": str(spec)}
        out[name] = ModelSpec.model_validate(spec or {})
    return out


def _compact(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        name, sep, path = part.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise ValueError(f"models: {part!r} is not name=path")
        if name.strip() in out:
            raise ValueError(f"models: {name.strip()!r} is named twice")
        out[name.strip()] = path.strip()
    return out


def model_queue(queue: str, name: str) -> str:
    """The Celery queue of one model's requests."""
    return f"{queue}.{name}"


def unknown_model_reason(name: str, served: list[str]) -> str:
    return f"unknown model {name!r}; this server serves: {', '.join(served)}"


def no_worker_reason(name: str, depth: int, limit: int) -> str:
    return (f"model {name!r} has no live worker and {depth} requests are already waiting for it "
            f"(at most {limit} are accepted while none is running); retry later")
