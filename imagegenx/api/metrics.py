"""GET /metrics: Prometheus metrics of the API.

- ``imagegenx_api_requests_total{endpoint, method, status}`` and
  ``imagegenx_api_request_duration_seconds{endpoint, method}``; ``endpoint`` is
  the route pattern (``/api/v1/tasks/<task_id>``), so task ids never become labels.
- ``imagegenx_queue_depth{queue}``: messages waiting in the Celery queue on
  Redis (LLEN at scrape time, all priority lists), not yet taken by a worker.

Under gunicorn each process counts its own requests. With
``PROMETHEUS_MULTIPROC_DIR`` set (to an empty directory, before the API
processes start) every process writes its values there and any of them
answers /metrics with the sum over all of them (prometheus-client's
multiprocess mode).
"""
from __future__ import annotations

import os
import time
from collections.abc import Iterator

from flask import Blueprint, Response, current_app, g, request
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from redis.exceptions import RedisError

from imagegenx.api.services import Services

bp = Blueprint("metrics", __name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# kombu's Redis transport keeps priorities 3, 6 and 9 in lists of their own.
PRIORITY_SEP = "\x06\x16"
PRIORITY_STEPS = (3, 6, 9)

# Request metrics of this process (one registry for all apps in the process).
REGISTRY = CollectorRegistry()
REQUESTS = Counter("imagegenx_api_requests", "API requests answered, by route, method and status",
                   ["endpoint", "method", "status"], registry=REGISTRY)
LATENCY = Histogram("imagegenx_api_request_duration_seconds", "Time to answer an API request",
                    ["endpoint", "method"], registry=REGISTRY,
                    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0))


def queue_keys(queue: str) -> list[str]:
    """The Redis lists that hold a Celery queue's waiting messages."""
    return [queue] + [f"{queue}{PRIORITY_SEP}{p}" for p in PRIORITY_STEPS]


def queue_depths(svc: Services) -> dict[str, int]:
    """Messages waiting in each served model's queue, by queue (raises RedisError when
    Redis is down)."""
    queues = list(svc.settings.generation_queues.values())
    pipe = svc.redis.pipeline(transaction=False)
    for queue in queues:
        for key in queue_keys(queue):
            pipe.llen(key)
    counts = pipe.execute()
    n = len(PRIORITY_STEPS) + 1
    return {queue: int(sum(counts[i * n:(i + 1) * n])) for i, queue in enumerate(queues)}


def queue_depth(svc: Services) -> int:
    """Messages waiting in the service's queues (raises RedisError when Redis is down)."""
    return sum(queue_depths(svc).values())


class QueueDepthCollector(Collector):
    """Reads the queue length from Redis when Prometheus scrapes."""

    def __init__(self, svc: Services) -> None:
        self.svc = svc

    def collect(self) -> Iterator[Metric]:
        try:
            depths: dict[str, int] | None = queue_depths(self.svc)
        except RedisError:
            depths = None
        yield GaugeMetricFamily("imagegenx_queue_redis_up",
                                "Whether Redis answered the queue-depth query",
                                value=0 if depths is None else 1)
        if depths is None:
            return  # no reading: the series is absent rather than a false 0
        family = GaugeMetricFamily(
            "imagegenx_queue_depth",
            "Messages waiting in the Celery queue, not yet taken by a worker (LLEN at scrape time)",
            labels=["queue"])
        for queue, depth in depths.items():
            family.add_metric([queue], depth)
        yield family


class _ProcessMetrics(Collector):
    """This process's request metrics (single-process mode)."""

    def collect(self) -> Iterator[Metric]:
        return REGISTRY.collect()


def scrape_registry(svc: Services) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    if os.environ.get(MULTIPROC_ENV):
        multiprocess.MultiProcessCollector(registry)
    else:
        registry.register(_ProcessMetrics())
    registry.register(QueueDepthCollector(svc))
    return registry


@bp.before_app_request
def _start_timer() -> None:
    g.metrics_t0 = time.perf_counter()


@bp.after_app_request
def _count(response: Response) -> Response:
    endpoint = request.url_rule.rule if request.url_rule is not None else "<unmatched>"
    REQUESTS.labels(endpoint, request.method, str(response.status_code)).inc()
    t0 = g.get("metrics_t0")
    if t0 is not None:
        LATENCY.labels(endpoint, request.method).observe(time.perf_counter() - t0)
    return response


@bp.get("/metrics")
def metrics():  # type: ignore[no-untyped-def]
    svc: Services = current_app.extensions["imagegenx"]
    return Response(generate_latest(scrape_registry(svc)), mimetype=CONTENT_TYPE_LATEST)
