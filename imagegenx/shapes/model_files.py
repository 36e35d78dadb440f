"""Where the shipped shapes model lives (inside the package, so an install carries it)."""
from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent.parent
SHAPES_MODEL = PACKAGE_DIR / "engine" / "assets" / "shapes"
# The ``model`` setting's default: relative, so a settings file can name it; see ``packaged``.
SHAPES_MODEL_SETTING = Path(PACKAGE_DIR.name) / SHAPES_MODEL.relative_to(PACKAGE_DIR)


def packaged(path: Path) -> Path:
    """``path``, or, when it is relative, missing from the working directory and names a
    file of the installed package (``imagegenx/...``), that file: the default works from
    any directory and in any install."""
    path = Path(path)
    if path.is_absolute() or path.exists():
        return path
    candidate = (PACKAGE_DIR.parent / path).resolve()
    if candidate.is_relative_to(PACKAGE_DIR) and candidate.exists():
        return candidate
    return path


def is_shipped_shapes_model(path: Path) -> bool:
    """Whether the ``model`` setting names the shipped shapes model."""
    return packaged(Path(path)).resolve() == SHAPES_MODEL.resolve()
