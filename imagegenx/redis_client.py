"""Redis clients for the service's own keys, from the broker URL.

Plain ``redis://`` / ``rediss://`` / ``unix://`` URLs, or kombu's Sentinel form
``sentinel://[:password@]host:port[;sentinel://host:port...]/db`` with the
master's name from settings (``sentinel_master``), so the API, the worker and
Celery all follow the same master after a failover.
"""
from __future__ import annotations

from typing import Any
from urllib.parse import unquote, urlsplit

import redis
from redis.sentinel import Sentinel

SENTINEL_SCHEME = "sentinel://"


def is_sentinel(url: str) -> bool:
    return url.startswith(SENTINEL_SCHEME)


def is_redis(url: str) -> bool:
    return url.startswith(("redis://", "rediss://", "unix://", SENTINEL_SCHEME))


def parse_sentinel(url: str) -> tuple[list[tuple[str, int]], int, str | None]:
    """(sentinel addresses, db, password) of a ``sentinel://`` URL (kombu's syntax)."""
    hosts: list[tuple[str, int]] = []
    db = 0
    password: str | None = None
    for part in url.split(";"):
        parts = urlsplit(part.strip())
        if parts.scheme != "sentinel" or not parts.hostname:
            raise ValueError(f"not a sentinel URL: {part!r}")
        hosts.append((parts.hostname, parts.port or 26379))
        if parts.password:
            password = unquote(parts.password)
        if parts.path.strip("/"):
            db = int(parts.path.strip("/"))
    return hosts, db, password


def redis_client(url: str, sentinel_master: str = "", **kwargs: Any) -> redis.Redis:
    """A client of the Redis behind ``url`` (the current master, for Sentinel)."""
    if not is_sentinel(url):
        return redis.Redis.from_url(url, **kwargs)
    if not sentinel_master:
        raise ValueError("a sentinel:// URL needs IMAGEGENX_SENTINEL_MASTER (the master's name)")
    hosts, db, password = parse_sentinel(url)
    timeouts = {k: kwargs[k] for k in ("socket_timeout", "socket_connect_timeout") if k in kwargs}
    sentinel = Sentinel(hosts, sentinel_kwargs=timeouts, password=password, **timeouts)
    extra = {k: v for k, v in kwargs.items() if k not in timeouts}
    return sentinel.master_for(sentinel_master, db=db, **timeouts, **extra)
