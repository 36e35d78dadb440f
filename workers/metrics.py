"""Prometheus metrics of one worker process, served on its own HTTP port.

Counters and histograms are updated as requests finish and batches run;
the buffered/running gauges and the GPU readings (NVML, only where a GPU
is present) are read when Prometheus scrapes. Every worker process has its
own registry and port (``worker_metrics_port``): several workers on one host
need one port each (``imagegenx worker --gpus`` uses the base port + the GPU
index).
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

from celery import states
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.registry import Collector

from imagegenx.gpu import GpuStat

log = logging.getLogger(__name__)

OUTCOMES = (states.SUCCESS, states.FAILURE, states.REVOKED)
BATCH_IMAGES_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128, 256)
WAIT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ENGINE_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0, 120.0)


class WorkerMetrics:
    """The worker's metrics, in a registry of its own."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "imagegenx_worker_requests", "Requests this worker finished, by outcome "
            "(SUCCESS, FAILURE, REVOKED)", ["outcome"], registry=r)
        for outcome in OUTCOMES:
            self.requests.labels(outcome)  # present at 0 from the start, so rate() works
        self.images = Counter(
            "imagegenx_worker_images", "Images generated and stored; rate() gives images/s",
            registry=r)
        self.batch_images = Histogram(
            "imagegenx_worker_batch_images", "Images per batch", buckets=BATCH_IMAGES_BUCKETS,
            registry=r)
        self.buffer_wait = Histogram(
            "imagegenx_worker_buffer_wait_seconds",
            "Time a request waited in the worker's buffer before its batch started",
            buckets=WAIT_BUCKETS, registry=r)
        self.engine_seconds = Histogram(
            "imagegenx_worker_batch_engine_seconds",
            "Engine (GPU) time of one batch: denoising and decoding", buckets=ENGINE_BUCKETS,
            registry=r)
        self.step_rows = Histogram(
            "imagegenx_worker_step_rows", "Image rows per UNet call (step scheduler)",
            buckets=BATCH_IMAGES_BUCKETS, registry=r)
        self.step_seconds = Histogram(
            "imagegenx_worker_step_seconds", "Time of one UNet call with its sampler update "
            "(step scheduler; device time on CUDA, counted once the call has ended)",
            buckets=WAIT_BUCKETS, registry=r)
        self.batch_seconds = Histogram(
            "imagegenx_worker_batch_seconds",
            "Wall time of one batch: engine, post-processing, storage and results",
            buckets=ENGINE_BUCKETS, registry=r)

    # -- updates (called from BatchStats) -------------------------------------
    def outcome(self, state: str, images: int = 0) -> None:
        self.requests.labels(state).inc()
        if images:
            self.images.inc(images)

    def batch(self, images: int, seconds: float) -> None:
        self.batch_images.observe(images)
        self.batch_seconds.observe(seconds)

    def step(self, rows: int, seconds: float) -> None:
        self.step_rows.observe(rows)
        self.step_seconds.observe(seconds)

    def engine(self, seconds: float) -> None:
        self.engine_seconds.observe(seconds)

    def wait(self, seconds: float) -> None:
        self.buffer_wait.observe(seconds)

    # -- scrape-time readings -----------------------------------------------
    def watch(self, snapshot: Callable[[], tuple[list[Any], list[Any]]],
              gpus: Callable[[], list[GpuStat]], info: Callable[[], dict[str, str]]) -> None:
        """Gauges read at scrape time: buffered/running requests, GPUs, identity."""
        self.registry.register(_LiveCollector(snapshot, gpus, info))

    def serve(self, port: int, host: str = "127.0.0.1") -> Any | None:
        """Start the HTTP server; None (with a warning) when the port is taken."""
        try:
            server, _thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            log.warning("worker metrics not served: cannot listen on %s:%d (%s); give each "
                        "worker its own IMAGEGENX_WORKER_METRICS_PORT", host, port, exc)
            return None
        log.info("Prometheus metrics on http://%s:%d/metrics", host, port)
        return server


class _LiveCollector(Collector):
    def __init__(self, snapshot: Callable[[], tuple[list[Any], list[Any]]],
                 gpus: Callable[[], list[GpuStat]], info: Callable[[], dict[str, str]]) -> None:
        self._snapshot = snapshot
        self._gpus = gpus
        self._info = info

    def collect(self) -> Iterator[Metric]:
        buffered, running = self._snapshot()
        yield GaugeMetricFamily("imagegenx_worker_buffered_requests",
                                "Requests received and waiting for a batch", value=len(buffered))
        yield GaugeMetricFamily("imagegenx_worker_running_requests",
                                "Requests in the batch that is running", value=len(running))
        info = InfoMetricFamily("imagegenx_worker", "Worker identity")
        info.add_metric([], self._info())
        yield info
        stats = self._gpus()
        if not stats:
            return  # no NVML or no GPU: the GPU series are simply absent
        labels = ["gpu", "name", "uuid"]
        util = GaugeMetricFamily("imagegenx_worker_gpu_utilization_ratio",
                                 "Share of the last sample period the GPU was busy (NVML)", labels=labels)
        used = GaugeMetricFamily("imagegenx_worker_gpu_memory_used_bytes",
                                 "GPU memory in use, all processes (NVML)", labels=labels)
        total = GaugeMetricFamily("imagegenx_worker_gpu_memory_total_bytes",
                                  "GPU memory (NVML)", labels=labels)
        for g in stats:
            values = [str(g.index), g.name, g.uuid]
            if g.utilization is not None:
                util.add_metric(values, g.utilization)
            used.add_metric(values, g.memory_used_bytes)
            total.add_metric(values, g.memory_total_bytes)
        yield util
        yield used
        yield total
