"""The shipped shapes model: the default of every entry point, small, fp16, finished,
and never silently replaced by a stand-in."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors import safe_open

from imagegenx.engine import model_init
from imagegenx.engine.single_file import ModelLoadError
from imagegenx.settings import Settings
from imagegenx.shapes.model_files import SHAPES_MODEL, packaged


def test_it_is_the_default_model_from_any_directory(clean_env: None, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().model == Path("imagegenx/engine/assets/shapes")
    assert Settings().served_model_name == "shapes"
    monkeypatch.chdir(tmp_path)
    assert model_init.ensure_model(Settings().model) == SHAPES_MODEL
    assert not (tmp_path / "imagegenx").exists()


def test_only_package_files_are_taken_from_the_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert packaged(Path("imagegenx/engine/assets/shapes")) == SHAPES_MODEL
    assert packaged(Path("imagegenx/engine/assets/absent")) == Path("imagegenx/engine/assets/absent")
    assert packaged(Path("configs/sd15")) == Path("configs/sd15")  # beside the package, not in it
    (tmp_path / "imagegenx/engine/assets/shapes").mkdir(parents=True)
    assert packaged(Path("imagegenx/engine/assets/shapes")) == Path("imagegenx/engine/assets/shapes")
    with pytest.raises(ModelLoadError, match="working directory holds no model and hides the shipped"):
        model_init.ensure_model(Path("imagegenx/engine/assets/shapes"))


def test_it_is_a_finished_fp16_diffusers_folder_within_the_size_budget() -> None:
    assert (SHAPES_MODEL / "model_index.json").is_file()
    meta = json.loads((SHAPES_MODEL / "training.json").read_text())
    assert meta["finished"] is True and meta["seed"] == 0
    weights = sorted(SHAPES_MODEL.rglob("*.safetensors"))
    assert [w.parent.name for w in weights] == ["text_encoder", "unet", "vae"]
    assert sum(w.stat().st_size for w in weights) <= 25 * 2**20
    for path in weights:
        with safe_open(str(path), framework="pt") as f:
            assert {str(f.get_slice(k).get_dtype()) for k in f.keys()} == {"F16"}, path


def test_ensure_model_returns_it_untouched() -> None:
    assert model_init.ensure_model(SHAPES_MODEL) == SHAPES_MODEL


def test_a_missing_shipped_model_is_an_error_not_a_stand_in(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    gone = tmp_path / "assets" / "shapes"
    monkeypatch.setattr(model_init, "SHAPES_MODEL", gone)
    with pytest.raises(ModelLoadError, match="shipped shapes model is missing.*IMAGEGENX_MODEL"):
        model_init.ensure_model(gone)
    assert not gone.exists()
    monkeypatch.chdir(tmp_path)  # the default setting, with the package's copy gone too
    monkeypatch.setattr(model_init, "packaged", lambda p: p)
    with pytest.raises(ModelLoadError, match="shipped shapes model is missing"):
        model_init.ensure_model(Path("imagegenx/engine/assets/shapes"))
    assert not (tmp_path / "imagegenx").exists()
