"""A compiled artifact in S3 (a local S3 server): written by the warmup side,
read and checked by the worker side with the storage settings."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from imagegenx import compile_cache
from imagegenx.engine.fastpath import FastPathOptions
from imagegenx.settings import Settings
from tests.service import free_port

pytestmark = pytest.mark.integration

BUCKET = "compiled"


@pytest.fixture()
def settings(tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Settings]:
    moto_server = pytest.importorskip("moto.server", reason="moto[server] not installed")
    import boto3

    port = free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                        "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)
    endpoint = f"http://127.0.0.1:{port}"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=BUCKET)
    try:
        yield Settings(model=tiny_model, s3_endpoint_url=endpoint, s3_region="us-east-1",
                       compile_cache=f"s3://{BUCKET}/sd/h200")
    finally:
        server.stop()


def test_an_artifact_in_s3_is_checked_then_loaded(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = SimpleNamespace(fast_options=FastPathOptions(buckets=(1, 2)), device=torch.device("cpu"),
                             dtype=torch.float32)
    monkeypatch.setattr(torch.compiler, "save_cache_artifacts", lambda: (b"compiled-bytes", None))
    loaded: list[bytes] = []
    monkeypatch.setattr(torch.compiler, "load_cache_artifacts", lambda data: loaded.append(data) or object())
    source = settings.compile_cache
    assert compile_cache.load_compile_cache(source, compile_cache.engine_manifest(settings, engine), settings) \
        == f"no manifest.json at {source}"

    manifest = compile_cache.save_compile_cache(source, compile_cache.engine_manifest(settings, engine), settings)
    assert manifest.artifact_bytes == len(b"compiled-bytes")
    assert compile_cache.use_compile_cache(engine, settings) is True
    assert loaded == [b"compiled-bytes"]

    other = SimpleNamespace(fast_options=FastPathOptions(buckets=(1, 2, 4)), device=torch.device("cpu"),
                            dtype=torch.float32)
    reason = compile_cache.load_compile_cache(source, compile_cache.engine_manifest(settings, other), settings)
    assert reason is not None and reason.startswith("batch buckets differs")
    assert loaded == [b"compiled-bytes"]
