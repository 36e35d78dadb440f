"""Result PNGs: both deflate settings are lossless, the setting reaches the pipeline's
rendering, and a wrong value is refused naming the setting."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from imagegenx.engine.synthetic import SyntheticEngine
from imagegenx.pipeline import BatchPipeline
from imagegenx.pipeline_factory import build_pipeline
from imagegenx.postprocess import PNG_OPTIONS, render, to_png
from imagegenx.request_state import RequestState
from imagegenx.schemas import GenerateRequest, Postprocess
from imagegenx.settings import Settings
from imagegenx.storage import LocalStorage


def _picture() -> Image.Image:
    """A smooth field with fine grain, like a photograph (not all noise, not flat)."""
    rng = np.random.default_rng(0)
    low = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((96, 96), Image.Resampling.BICUBIC)
    grain = rng.integers(-3, 4, (96, 96, 3))
    return Image.fromarray(np.clip(np.asarray(low).astype(int) + grain, 0, 255).astype(np.uint8))


def _pixels(png: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(png)) as im:
        assert im.format == "PNG"
        return np.asarray(im.convert("RGB"))


@pytest.mark.parametrize("compression", sorted(PNG_OPTIONS))
def test_every_compression_is_lossless(compression: str) -> None:
    picture = _picture()
    full, thumb = render(picture, Postprocess(thumbnail=32), compression)  # type: ignore[arg-type]
    assert np.array_equal(_pixels(full), np.asarray(picture))
    assert _pixels(thumb).shape == (32, 32, 3)


def test_fast_deflates_with_run_length_matches() -> None:
    """fast is not a zlib level: its stream is neither level 6's nor level 1's."""
    picture = _picture()
    level_1 = io.BytesIO()
    picture.save(level_1, format="PNG", compress_level=1)
    assert to_png(picture, "fast") != to_png(picture, "small")
    assert to_png(picture, "fast") != level_1.getvalue()


def test_the_setting_reaches_the_pipeline(clean_env: None, tmp_path: Path) -> None:
    common = {"engine": "synthetic", "storage_root": tmp_path}
    assert build_pipeline(Settings(**common)).png_compression == "fast"
    assert build_pipeline(Settings(**common, png_compression="small")).png_compression == "small"


@pytest.mark.parametrize("compression", sorted(PNG_OPTIONS))
def test_stored_results_are_encoded_as_the_pipeline_says(compression: str, tmp_path: Path) -> None:
    pipe = BatchPipeline(SyntheticEngine(), LocalStorage(tmp_path), "http://x", "m",
                         png_compression=compression)  # type: ignore[arg-type]
    state = RequestState(id="a", request=GenerateRequest(prompt="a red circle", seed=3, width=64,
                                                         height=64, steps=2))
    assert pipe.run([state])["a"].result is not None
    stored = (tmp_path / "a/0.png").read_bytes()
    with Image.open(io.BytesIO(stored)) as im:
        assert stored == to_png(im.convert("RGB"), compression)  # type: ignore[arg-type]


def test_an_unknown_compression_names_the_setting(clean_env: None,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMAGEGENX_PNG_COMPRESSION", "tiny")
    with pytest.raises(ValidationError) as err:
        Settings()
    assert "png_compression" in str(err.value)
