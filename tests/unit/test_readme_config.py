"""The README's configuration table names every setting."""
from __future__ import annotations

from pathlib import Path

from imagegenx.settings import Settings

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def test_every_setting_is_documented() -> None:
    missing = [f"IMAGEGENX_{name.upper()}" for name in Settings.model_fields
               if f"`IMAGEGENX_{name.upper()}`" not in README]
    assert not missing, f"undocumented settings: {missing}"
