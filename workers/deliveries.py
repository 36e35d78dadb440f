"""Per-request delivery counts, kept in Redis so every worker sees them.

With late acks a message whose worker dies is delivered again; a request
that kills its worker would be delivered forever. Each request has a small
hash ``imagegenx:deliveries:<task id>`` with two counters:

- ``received``: deliveries to a worker (counted when the worker receives it);
- ``started``: deliveries whose batch started running.

A delivery that ran returns no message to the queue unless its worker was
lost (a finished request is acknowledged), so ``started`` counts the runs a
lost worker took down. A request is given up when that count reaches
``max_deliveries``; one that was merely buffered by a worker that died is
not held responsible. A request that ran before runs alone in its batch, so
a poison request cannot take its batch neighbours down with it again.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import redis

from imagegenx.redis_client import is_redis, redis_client

log = logging.getLogger(__name__)

PREFIX = "imagegenx:deliveries:"


@dataclass(frozen=True)
class Deliveries:
    received: int = 1
    started: int = 0

    @property
    def redelivered(self) -> bool:
        return self.received > 1


class DeliveryLedger:
    """Counts deliveries per task id. Redis errors never stop a request:
    they are logged and the request goes on uncounted."""

    def __init__(self, client: Any, ttl_s: int) -> None:
        self.client = client
        self.ttl_s = max(1, int(ttl_s))

    @classmethod
    def from_url(cls, url: str, ttl_s: int, sentinel_master: str = "") -> "DeliveryLedger | None":
        if not is_redis(url):
            log.warning("delivery counting needs a Redis broker; %s is not one", url.split("://")[0])
            return None
        client = redis_client(url, sentinel_master, socket_connect_timeout=2.0, socket_timeout=5.0)
        return cls(client, ttl_s)

    @staticmethod
    def key(task_id: str) -> str:
        return PREFIX + task_id

    def received(self, task_id: str) -> Deliveries:
        """Count one more delivery of ``task_id``; returns the counts so far."""
        key = self.key(task_id)
        try:
            pipe = self.client.pipeline(transaction=True)
            pipe.hincrby(key, "received", 1)
            pipe.hget(key, "started")
            pipe.expire(key, self.ttl_s)
            received, started, _ = pipe.execute()
        except redis.RedisError as exc:
            log.warning("could not count the delivery of %s: %r", task_id, exc)
            return Deliveries()
        return Deliveries(int(received), int(started or 0))

    def started(self, task_ids: Iterable[str]) -> None:
        """Record that a batch holding these requests starts now."""
        ids = list(task_ids)
        if not ids:
            return
        try:
            pipe = self.client.pipeline(transaction=False)
            for task_id in ids:
                pipe.hincrby(self.key(task_id), "started", 1)
                pipe.expire(self.key(task_id), self.ttl_s)
            pipe.execute()
        except redis.RedisError as exc:
            log.warning("could not record the start of %d requests: %r", len(ids), exc)
