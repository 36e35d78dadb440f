"""Shared fixtures: Redis, an isolated Redis database per test session, models."""
from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from tests.service import redis_server  # noqa: E402


@pytest.fixture(scope="session")
def redis_base() -> Iterator[str]:
    with redis_server() as url:
        yield url


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from imagegenx.engine.model_init import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("models") / "tiny", seed=0)


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No IMAGEGENX_* variable of the calling shell leaks into settings under test."""
    for name in list(os.environ):
        if name.startswith("IMAGEGENX_"):
            monkeypatch.delenv(name)
