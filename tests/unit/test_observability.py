"""Pieces of metrics, GPU readings, storage and settings that need no worker."""
from __future__ import annotations

import sys
import types
from typing import Any

import pytest
from prometheus_client import generate_latest
from pydantic import ValidationError

from imagegenx import gpu
from imagegenx.gpu import GpuStat
from imagegenx.launcher import worker_metrics_port
from imagegenx.settings import Settings
from workers.executor import BatchStats
from workers.metrics import WorkerMetrics


@pytest.fixture(autouse=True)
def _no_service_env(clean_env: None) -> None:
    """These tests read settings from the code defaults only."""


# -- settings ------------------------------------------------------------------

def test_s3_storage_needs_a_bucket_and_a_valid_expiry() -> None:
    with pytest.raises(ValidationError, match="s3_bucket"):
        Settings(storage_backend="s3")
    with pytest.raises(ValidationError, match="s3_presign_expires_s"):
        Settings(storage_backend="s3", s3_bucket="b", s3_presign_expires_s=8 * 86400)
    assert Settings(storage_backend="s3", s3_bucket="b").s3_presign_expires_s == 86400


def test_each_gpu_worker_gets_its_own_metrics_port(monkeypatch: pytest.MonkeyPatch) -> None:
    assert [worker_metrics_port(9450, i) for i in (0, 1, 7)] == [9450, 9451, 9457]
    assert worker_metrics_port(0, 3) == 0  # disabled stays disabled

    from click.testing import CliRunner

    from imagegenx import cli, launcher

    spawned: dict[str, dict[str, str]] = {}
    monkeypatch.setattr(launcher, "count_gpus", lambda: 2)
    monkeypatch.setattr(launcher.Supervisor, "spawn",
                        lambda self, name, cmd, env=None: spawned.__setitem__(name, env))
    monkeypatch.setattr(launcher.Supervisor, "wait", lambda self: 0)
    monkeypatch.setattr(launcher.Supervisor, "trap_signals", lambda self: None)  # not pytest's
    monkeypatch.setenv("IMAGEGENX_ENGINE", "synthetic")
    monkeypatch.setenv("IMAGEGENX_WORKER_METRICS_PORT", "9600")
    result = CliRunner().invoke(cli.main, ["worker", "--gpus", "0,1"])
    assert result.exit_code == 0, result.output
    assert {name: (env["CUDA_VISIBLE_DEVICES"], env["IMAGEGENX_WORKER_METRICS_PORT"])
            for name, env in spawned.items()} == {"gpu0": ("0", "9600"), "gpu1": ("1", "9601")}


# -- GPU readings ----------------------------------------------------------------

class FakeNvml(types.ModuleType):
    """Two physical GPUs, as pynvml would describe them."""

    class NVMLError(Exception):
        pass

    def __init__(self) -> None:
        super().__init__("pynvml")
        self.inits = 0

    def nvmlInit(self) -> None:
        self.inits += 1

    def nvmlDeviceGetCount(self) -> int:
        return 2

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
        return i

    def nvmlDeviceGetHandleByUUID(self, uuid: str) -> int:
        if uuid != "GPU-bbbb":
            raise self.NVMLError("not found")
        return 1

    def nvmlDeviceGetIndex(self, handle: int) -> int:
        return handle

    def nvmlDeviceGetUUID(self, handle: int) -> str:
        return ["GPU-aaaa", "GPU-bbbb"][handle]

    def nvmlDeviceGetName(self, handle: int) -> bytes:
        return b"NVIDIA H100 80GB HBM3"

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> Any:
        return types.SimpleNamespace(used=(handle + 1) * 2**30, total=80 * 2**30)

    def nvmlDeviceGetUtilizationRates(self, handle: int) -> Any:
        return types.SimpleNamespace(gpu=[40, 95][handle], memory=10)


@pytest.fixture
def fake_nvml(monkeypatch: pytest.MonkeyPatch) -> FakeNvml:
    fake = FakeNvml()
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.setitem(gpu._state, "init", None)
    return fake


@pytest.mark.parametrize(("visible", "indices"), [
    (None, [0, 1]), ("1", [1]), ("1,0", [1, 0]), ("GPU-bbbb", [1]), ("0,5,1", [0]), ("", []),
])
def test_the_gpus_a_worker_reports_follow_cuda_visible_devices(
        fake_nvml: FakeNvml, monkeypatch: pytest.MonkeyPatch, visible: str | None,
        indices: list[int]) -> None:
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    stats = gpu.visible_gpus()
    assert [g.index for g in stats] == indices
    if 1 in indices:
        g1 = next(g for g in stats if g.index == 1)
        assert (g1.name, g1.uuid, g1.utilization) == ("NVIDIA H100 80GB HBM3", "GPU-bbbb", 0.95)
        assert (g1.memory_used_bytes, g1.memory_total_bytes) == (2 * 2**30, 80 * 2**30)
    gpu.visible_gpus()
    assert fake_nvml.inits == 1  # initialised once per process


def test_without_nvml_there_is_nothing_to_report(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import fails
    monkeypatch.setitem(gpu._state, "init", None)
    assert gpu.visible_gpus() == []

    class Broken(FakeNvml):
        def nvmlInit(self) -> None:
            raise self.NVMLError("NVML Shared Library Not Found")

    monkeypatch.setitem(sys.modules, "pynvml", Broken())
    monkeypatch.setitem(gpu._state, "init", None)
    assert gpu.visible_gpus() == []


# -- worker metrics ----------------------------------------------------------------

def _exposition(metrics: WorkerMetrics) -> str:
    return generate_latest(metrics.registry).decode()


def test_batch_stats_feed_the_worker_metrics() -> None:
    metrics = WorkerMetrics()
    stats = BatchStats(metrics=metrics)
    metrics.watch(lambda: (["a", "b"], ["c"]), lambda: [], lambda: {"hostname": "gpu0@h"})
    stats.record_wait(0.03)
    stats.record(3, 2, 0.8)
    stats.record_engine(0.6)
    stats.record_outcome("SUCCESS", images=2)
    stats.record_outcome("SUCCESS", images=1)
    stats.record_outcome("FAILURE")
    stats.record_outcome("REVOKED")
    text = _exposition(metrics)
    for line in (
        'imagegenx_worker_requests_total{outcome="SUCCESS"} 2.0',
        'imagegenx_worker_requests_total{outcome="FAILURE"} 1.0',
        'imagegenx_worker_requests_total{outcome="REVOKED"} 1.0',
        "imagegenx_worker_images_total 3.0",
        'imagegenx_worker_batch_images_bucket{le="3.0"} 1.0',
        'imagegenx_worker_batch_images_bucket{le="2.0"} 0.0',
        'imagegenx_worker_buffer_wait_seconds_bucket{le="0.05"} 1.0',
        "imagegenx_worker_batch_engine_seconds_sum 0.6",
        "imagegenx_worker_buffered_requests 2.0",
        "imagegenx_worker_running_requests 1.0",
        'imagegenx_worker_info{hostname="gpu0@h"} 1.0',
    ):
        assert line in text, line
    assert "gpu_" not in text
    assert (stats.succeeded, stats.failed, stats.revoked) == (2, 1, 1)
    assert stats.as_dict()["succeeded"] == 2


def test_gpu_series_come_from_nvml_readings() -> None:
    metrics = WorkerMetrics()
    reading = [GpuStat(index=3, uuid="GPU-x", name="NVIDIA H200", utilization=0.5,
                       memory_used_bytes=10, memory_total_bytes=100),
               GpuStat(index=-1, uuid="MIG-y", name="NVIDIA H200 MIG 1g.18gb", utilization=None,
                       memory_used_bytes=1, memory_total_bytes=18)]
    metrics.watch(lambda: ([], []), lambda: reading, lambda: {})
    text = _exposition(metrics)
    labels = '{gpu="3",name="NVIDIA H200",uuid="GPU-x"}'
    assert f"imagegenx_worker_gpu_utilization_ratio{labels} 0.5" in text
    assert f"imagegenx_worker_gpu_memory_used_bytes{labels} 10.0" in text
    assert f"imagegenx_worker_gpu_memory_total_bytes{labels} 100.0" in text
    assert 'imagegenx_worker_gpu_utilization_ratio{gpu="-1"' not in text  # unknown: no sample
    assert 'imagegenx_worker_gpu_memory_used_bytes{gpu="-1",name="NVIDIA H200 MIG 1g.18gb"' in text


def test_a_taken_port_leaves_the_worker_running_without_metrics() -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        assert WorkerMetrics().serve(s.getsockname()[1]) is None


# -- storage ------------------------------------------------------------------------

def test_s3_storage_presigns_sigv4_urls_under_its_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("boto3")
    from imagegenx.storage import InvalidKey, S3Storage, create_storage

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    storage = create_storage(Settings(storage_backend="s3", s3_bucket="bucket", s3_prefix="img/",
                                      s3_endpoint_url="http://127.0.0.1:9", s3_region="eu-west-1",
                                      s3_addressing_style="path", s3_presign_expires_s=120))
    assert isinstance(storage, S3Storage)
    url = storage.url("task/0.png")  # signing is local: no request is made
    assert url.startswith("http://127.0.0.1:9/bucket/img/task/0.png?")
    assert "X-Amz-Algorithm=AWS4-HMAC-SHA256" in url and "X-Amz-Expires=120" in url
    assert "AKIDEXAMPLE%2F" in url and "%2Feu-west-1%2Fs3%2F" in url
    with pytest.raises(InvalidKey):
        storage.url("../etc/passwd")


def test_openapi_documents_workers_and_metrics(redis_base: str) -> None:
    from openapi_spec_validator import validate

    from imagegenx.api import create_app

    settings = Settings(broker_url=f"{redis_base}/3", result_backend=f"{redis_base}/3")
    spec = create_app(settings).test_client().get("/api/v1/openapi.json").json
    validate(spec)
    workers = spec["paths"]["/api/v1/workers"]["get"]
    assert workers["security"] == [{"ApiKey": []}]
    ref = workers["responses"]["200"]["content"]["application/json"]["schema"]["$ref"]
    assert ref.endswith("/WorkersResponse")
    assert "gpus" in spec["components"]["schemas"]["WorkerInfo"]["properties"]
    assert "/metrics" in spec["paths"]
