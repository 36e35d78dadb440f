"""Where finished images live. Keys are relative paths; nothing escapes the root."""
from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Protocol

_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)*$")


class InvalidKey(ValueError):
    """A storage key that could address something outside the storage root."""


class Storage(Protocol):
    def put(self, key: str, data: bytes, content_type: str) -> None: ...
    def path(self, key: str) -> Path: ...


def check_key(key: str) -> str:
    if len(key) > 512 or not _KEY_RE.fullmatch(key) or ".." in key.split("/"):
        raise InvalidKey(f"invalid storage key: {key!r}")
    return key


class LocalStorage:
    """Files under one root directory, written atomically (temp file + rename)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()

    def path(self, key: str) -> Path:
        check_key(key)
        path = (self.root / key).resolve()
        if not path.is_relative_to(self.root):
            raise InvalidKey(f"invalid storage key: {key!r}")
        return path

    def put(self, key: str, data: bytes, content_type: str = "image/png") -> None:
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
