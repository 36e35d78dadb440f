"""Where the shipped shapes model lives (inside the package, so an install carries it)."""
from __future__ import annotations

from pathlib import Path

SHAPES_MODEL = Path(__file__).resolve().parent.parent / "engine" / "assets" / "shapes"
