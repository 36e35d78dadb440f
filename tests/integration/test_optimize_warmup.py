"""`imagegenx optimize warmup` on the CPU (tiny model): the engine compiles nothing
there, so the manifest says so, and a worker refuses such an artifact."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from imagegenx.cli import main  # noqa: E402
from imagegenx.compile_manifest import CompileManifest, mismatch  # noqa: E402


def test_warmup_writes_a_manifest_of_the_workers_settings(tiny_model: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {"IMAGEGENX_MODEL": str(tiny_model), "IMAGEGENX_DEVICE": "cpu", "IMAGEGENX_DTYPE": "fp32",
                        "IMAGEGENX_ENGINE": "diffusion", "IMAGEGENX_BATCH_BUCKETS": "1,2,4",
                        "IMAGEGENX_COMPILE_CACHE": str(tmp_path / "ignored")}.items():
        monkeypatch.setenv(name, value)
    out = tmp_path / "artifact"
    result = CliRunner().invoke(main, ["optimize", "warmup", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "compiles nothing" in result.output and f"-> {out}" in result.output
    manifest = CompileManifest.model_validate(json.loads((out / "manifest.json").read_text()))
    assert manifest.artifact is None and manifest.buckets == (1, 2, 4) and manifest.dtype == "fp32"
    assert manifest.gpu_arch.startswith("cpu-") and manifest.build_s is not None
    assert not (out / "torch-compile-cache.bin").exists()
    reason = mismatch(manifest.model_copy(update={"artifact": "x"}), manifest)
    assert reason is not None and "no compiled code" in reason


def test_warmup_refuses_the_synthetic_engine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMAGEGENX_ENGINE", "synthetic")
    result = CliRunner().invoke(main, ["optimize", "warmup", "--out", str(tmp_path)])
    assert result.exit_code != 0 and "nothing to compile" in result.output
