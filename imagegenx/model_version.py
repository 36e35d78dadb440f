"""The version string a worker puts in its results when none is configured.

Derived from the model's files (relative names, sizes, modification times), not
their contents: hashing gigabytes of weights would slow every worker start, and
replacing the files on deployment changes their times anyway. Set the model's
``version`` (IMAGEGENX_MODEL_VERSION or ``models.<name>.version``) for a name
that means something to people.
"""
from __future__ import annotations

import hashlib
from pathlib import Path


def derived_version(engine: str, path: Path | None) -> str:
    """``<folder or file name>-<12 hex digits>``, or ``synthetic`` for the synthetic engine."""
    if engine == "synthetic" or path is None:
        return "synthetic"
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        try:
            st = f.stat()
        except OSError:
            continue
        rel = f.relative_to(path) if path.is_dir() else Path(f.name)
        digest.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    name = path.stem if path.suffix.lower() == ".safetensors" else path.name
    return f"{name}-{digest.hexdigest()[:12]}"
