"""Compiled artifacts on disk (imagegenx/compile_cache.py): model identity, save/load,
refusal with one log line, and the setting's validation."""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from pydantic import ValidationError

from imagegenx import compile_cache
from imagegenx.compile_manifest import ARTIFACT_FILE, MANIFEST_FILE, CompileManifest
from imagegenx.engine.fastpath import FastPathOptions
from imagegenx.settings import Settings


@pytest.fixture()
def model(tmp_path: Path, tiny_model: Path) -> Path:
    copy = tmp_path / "model"
    shutil.copytree(tiny_model, copy)
    return copy


def _engine(buckets: tuple[int, ...] = (1, 2, 4)) -> SimpleNamespace:
    return SimpleNamespace(fast_options=FastPathOptions(buckets=buckets), device=torch.device("cpu"),
                           dtype=torch.float32)


def test_model_identity_follows_configs_and_weight_sizes(model: Path) -> None:
    first = compile_cache.model_identity(model)
    assert compile_cache.model_identity(model) == first
    (model / ".cache").mkdir()
    (model / ".cache" / "x").write_text("ignored")
    assert compile_cache.model_identity(model) == first
    config = model / "unet" / "config.json"
    data = json.loads(config.read_text())
    config.write_text(json.dumps({**data, "sample_size": data["sample_size"] * 2}))
    second = compile_cache.model_identity(model)
    assert second != first
    weights = next((model / "unet").glob("*.safetensors"))
    with weights.open("ab") as f:
        f.write(b"\0")
    assert compile_cache.model_identity(model) != second


def test_a_single_file_model_includes_its_component_configs(tmp_path: Path) -> None:
    ckpt = tmp_path / "m.safetensors"
    ckpt.write_bytes(b"x" * 10)
    configs = tmp_path / "configs"
    configs.mkdir()
    (configs / "unet.json").write_text("{}")
    first = compile_cache.model_identity(ckpt, configs)
    (configs / "unet.json").write_text('{"a": 1}')
    assert compile_cache.model_identity(ckpt, configs) != first


def _write_artifact(where: Path, manifest: CompileManifest, data: bytes = b"artifact") -> None:
    where.mkdir(parents=True, exist_ok=True)
    (where / ARTIFACT_FILE).write_bytes(data)
    (where / MANIFEST_FILE).write_text(manifest.model_dump_json())


def test_a_fitting_artifact_is_loaded_a_mismatched_one_is_not(tmp_path: Path, model: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    loaded: list[bytes] = []
    monkeypatch.setattr(torch.compiler, "load_cache_artifacts", lambda data: loaded.append(data) or object())
    settings = Settings(model=model)
    expected = compile_cache.engine_manifest(settings, _engine())
    assert expected.buckets == (1, 2, 4) and expected.dtype == "fp32" and expected.gpu_arch.startswith("cpu-")
    _write_artifact(tmp_path / "good", expected, b"compiled")
    assert compile_cache.load_compile_cache(str(tmp_path / "good"), expected, settings) is None
    assert loaded == [b"compiled"]

    _write_artifact(tmp_path / "bad", expected.model_copy(update={"buckets": (1, 2)}))
    reason = compile_cache.load_compile_cache(str(tmp_path / "bad"), expected, settings)
    assert reason is not None and reason.startswith("batch buckets differs")
    assert loaded == [b"compiled"]  # not loaded

    assert compile_cache.load_compile_cache(str(tmp_path / "none"), expected, settings) == \
        f"no {MANIFEST_FILE} at {tmp_path / 'none'}"
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / MANIFEST_FILE).write_text("{not json")
    reason = compile_cache.load_compile_cache(str(tmp_path / "junk"), expected, settings)
    assert reason is not None and reason.startswith(f"unreadable {MANIFEST_FILE}") and "\n" not in reason


@pytest.mark.parametrize("older_tracing", [None, "size-oblivious"])
def test_an_artifact_with_a_one_row_bucket_graph_is_refused(tmp_path: Path, model: Path,
                                                            older_tracing: str | None) -> None:
    """Artifacts built when the 1-row bucket had a UNet graph of its own (before any
    ``batch_tracing``, or traced size-obliviously) hold a graph this worker never runs."""
    settings = Settings(model=model)
    expected = compile_cache.engine_manifest(settings, _engine())
    assert expected.compile_options["batch_tracing"] == "rows-from-2"
    older = {k: v for k, v in expected.compile_options.items() if k != "batch_tracing"}
    if older_tracing is not None:
        older["batch_tracing"] = older_tracing
    _write_artifact(tmp_path / "old", expected.model_copy(update={"compile_options": older}))
    reason = compile_cache.load_compile_cache(str(tmp_path / "old"), expected, settings)
    assert reason is not None and reason.startswith("compile options differs")
    assert "batch_tracing=rows-from-2" in reason and "\n" not in reason


def test_the_worker_logs_one_line_when_it_refuses(tmp_path: Path, model: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    settings = Settings(model=model, compile_cache=str(tmp_path / "art"))
    expected = compile_cache.engine_manifest(settings, _engine())
    _write_artifact(tmp_path / "art", expected.model_copy(update={"torch_version": "0.0.1"}))
    with caplog.at_level(logging.INFO, logger="imagegenx.compile_cache"):
        assert compile_cache.use_compile_cache(_engine(), settings) is False
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "\n" not in lines[0]
    assert lines[0].startswith(f"compile cache {tmp_path / 'art'} refused (torch version differs: artifact 0.0.1")
    assert lines[0].endswith("compiling from scratch")


def test_an_engine_that_compiles_nothing_ignores_the_setting(tmp_path: Path, model: Path,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    settings = Settings(model=model, compile_cache=str(tmp_path))
    with caplog.at_level(logging.INFO, logger="imagegenx.compile_cache"):
        assert compile_cache.use_compile_cache(SimpleNamespace(fast_options=None), settings) is False
    assert "compiles nothing" in caplog.text


def test_save_then_load_real_compile_artifacts(tmp_path: Path, model: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A real Inductor compile on the CPU, saved, then loaded into empty local caches."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor-a"))
    torch._dynamo.reset()
    torch.compiler.reset()
    fn = torch.compile(lambda x: torch.sin(x) * 2 + 1)
    fn(torch.randn(8))
    settings = Settings(model=model)
    manifest = compile_cache.save_compile_cache(str(tmp_path / "art"), compile_cache.engine_manifest(
        settings, _engine()), settings, build_s=1.5)
    assert manifest.artifact == ARTIFACT_FILE and manifest.artifact_bytes > 0 and manifest.build_s == 1.5
    on_disk = CompileManifest.model_validate_json((tmp_path / "art" / MANIFEST_FILE).read_text())
    assert on_disk == manifest

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor-b"))
    torch._dynamo.reset()
    assert compile_cache.load_compile_cache(str(tmp_path / "art"), manifest, settings) is None
    assert any((tmp_path / "inductor-b").rglob("*"))  # the local cache was filled from the artifact


@pytest.mark.parametrize("value", ["s3://", "s3:///prefix", "http://host/x"])
def test_bad_compile_cache_locations_are_refused(value: str) -> None:
    with pytest.raises(ValidationError, match="compile_cache"):
        Settings(compile_cache=value)


def test_s3_locations_split_into_bucket_and_prefix() -> None:
    assert compile_cache._s3_parts("s3://bucket/a/b/") == ("bucket", "a/b/")
    assert compile_cache._s3_parts("s3://bucket") == ("bucket", "")
    assert Settings(compile_cache=" s3://bucket/a ").compile_cache == "s3://bucket/a"
