"""What a compiled artifact was built for, and whether it fits this worker.

Compiled kernels are only valid for the GPU architecture, the torch (and
Triton) build, the model weights, the batch buckets, the dtype and the compile
options they were built with. ``imagegenx optimize warmup`` writes a manifest
of these beside the artifact; a worker compares it with its own and refuses
a mismatch with a one-line reason (then it compiles as without an artifact).
Pure logic: no torch, no files.
"""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

FORMAT = 1
MANIFEST_FILE = "manifest.json"
ARTIFACT_FILE = "torch-compile-cache.bin"
PRECOMPILED_UNET_FILE = "unet.precompiled"


class CompileManifest(BaseModel):
    """The facts a compiled artifact depends on (``manifest.json``)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    format: int = FORMAT
    gpu_arch: str = Field(description="sm_90 (compute capability) or cpu-<machine>")
    device_name: str = Field(default="", description="informational: another card of the same arch fits")
    torch_version: str
    triton_version: str = ""
    model_id: str = Field(description="hash of the model's configs and weight file names and sizes")
    buckets: tuple[int, ...]
    dtype: str
    compile_options: dict[str, Any] = Field(default_factory=dict)
    artifact: str | None = Field(default=ARTIFACT_FILE, description="file name; None: nothing was compiled")
    artifact_bytes: int = 0
    precompiled_unet: str | None = Field(default=None, description="file of the precompiled UNet call, if built")
    precompiled_unet_bytes: int = 0
    precompiled_unet_code: str = Field(default="", description="precompile.code_id() of the build")
    created: str = ""
    build_s: float | None = None


# (field, words of the reason), in the order they are checked: the first mismatch is reported.
CHECKS: tuple[tuple[str, str], ...] = (
    ("format", "manifest format"),
    ("gpu_arch", "GPU architecture"),
    ("torch_version", "torch version"),
    ("triton_version", "Triton version"),
    ("model_id", "model"),
    ("buckets", "batch buckets"),
    ("dtype", "dtype"),
    ("compile_options", "compile options"),
)


def mismatch(expected: CompileManifest, found: CompileManifest) -> str | None:
    """None when ``found`` (the artifact's manifest) fits this worker (``expected``),
    else one line naming the first fact that differs, the artifact's value first."""
    for field, words in CHECKS:
        want, got = getattr(expected, field), getattr(found, field)
        if want != got:
            return f"{words} differs: artifact {_show(got)}, this worker {_show(want)}"
    if found.artifact is None:
        return "the artifact holds no compiled code (it was built without a compiled fast path)"
    return None


def _show(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    if isinstance(value, dict):
        return " ".join(f"{k}={v}" for k, v in sorted(value.items())) or "{}"
    return str(value) if value != "" else "(none)"
