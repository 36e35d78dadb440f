"""Every data file the packages read ships in the wheel: setup.cfg's package_data
patterns match each non-Python file of the packages that have data."""
from __future__ import annotations

import configparser
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _patterns() -> dict[str, list[str]]:
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    return {package: value.split() for package, value in cfg["options.package_data"].items()}


def _owned_by(f: Path, root: Path) -> bool:
    """``f`` belongs to the package at ``root``, not to a Python package below it."""
    return not any((d / "__init__.py").exists() for d in f.parents if d != root and d.is_relative_to(root))


def test_every_data_file_is_package_data() -> None:
    unmatched = []
    for package, patterns in _patterns().items():
        root = REPO / package.replace(".", "/")
        shipped = {f for pattern in patterns for f in root.glob(pattern) if f.is_file()}
        data = {f for f in root.rglob("*") if f.is_file() and f.suffix not in {".py", ".pyc"}
                and "__pycache__" not in f.parts and _owned_by(f, root)}
        unmatched += sorted(str(f.relative_to(REPO)) for f in data - shipped)
    assert not unmatched, f"not in setup.cfg [options.package_data]: {unmatched}"
