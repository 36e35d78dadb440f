"""Every data file the packages read ships in the wheel: setup.cfg's package_data
patterns match each tracked non-Python file inside a Python package."""
from __future__ import annotations

import configparser
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _patterns() -> dict[Path, list[str]]:
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    return {REPO / package.replace(".", "/"): value.split()
            for package, value in cfg["options.package_data"].items()}


def _package_of(f: Path) -> Path | None:
    """The innermost folder with an __init__.py that holds ``f``."""
    return next((d for d in f.parents if d.is_relative_to(REPO) and d != REPO and (d / "__init__.py").exists()),
                None)


def test_every_data_file_is_package_data() -> None:
    try:
        tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True,
                                 check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: the tracked files are unknown")
    patterns = _patterns()
    shipped = {f for root, globs in patterns.items() for g in globs for f in root.glob(g) if f.is_file()}
    unmatched = []
    for name in tracked:
        f = REPO / name
        package = _package_of(f)
        if package is None or f.suffix in {".py", ".pyc"} or package.relative_to(REPO).parts[0] == "tests":
            continue
        if f not in shipped:
            unmatched.append(name)
    assert not unmatched, f"not in setup.cfg [options.package_data]: {unmatched}"
