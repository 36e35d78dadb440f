"""Which API key submitted each task, so that no other key can read or revoke it.

Kept in Redis (``imagegenx:owner:<task id>``, expiring with the results). With a
database result backend (``db+postgresql://...``) each record is also written to
a table beside Celery's own (``imagegenx_task_owner``), so that the task history
stays readable over REST after Redis lost its data, as the results do.
"""
from __future__ import annotations

import logging
import threading
from datetime import datetime, timedelta, timezone
from typing import Any

import redis

log = logging.getLogger(__name__)

OWNER_PREFIX = "imagegenx:owner:"
DB_PREFIX = "db+"


class OwnershipUnavailable(ConnectionError):
    """The ownership store (Redis or the database) did not answer."""


def database_url(result_backend: str) -> str | None:
    """The SQLAlchemy URL of a ``db+...`` result backend, else None."""
    return result_backend[len(DB_PREFIX):] if result_backend.startswith(DB_PREFIX) else None


class _DatabaseOwners:
    """The durable copy: one row per task, deleted once past the results' lifetime."""

    def __init__(self, url: str, expires_s: int) -> None:
        from sqlalchemy import Column, DateTime, MetaData, String, Table, create_engine

        self.expires = timedelta(seconds=expires_s)
        self.engine = create_engine(url, pool_pre_ping=True, pool_recycle=3600)
        self.table = Table(
            "imagegenx_task_owner", MetaData(),
            Column("task_id", String(155), primary_key=True),
            Column("owner", String(64), nullable=False),
            Column("created", DateTime(timezone=True), nullable=False, index=True),
        )
        self._ready = False
        self._lock = threading.Lock()

    def _ensure_table(self) -> None:
        if not self._ready:
            with self._lock:
                if not self._ready:
                    self.table.metadata.create_all(self.engine, checkfirst=True)
                    self._ready = True

    def record(self, task_id: str, digest: str) -> None:
        now = datetime.now(timezone.utc)
        self._ensure_table()
        with self.engine.begin() as conn:
            conn.execute(self.table.delete().where(self.table.c.created < now - self.expires))
            conn.execute(self.table.insert().values(task_id=task_id, owner=digest, created=now))

    def owner(self, task_id: str) -> str | None:
        from sqlalchemy import select

        self._ensure_table()
        cutoff = datetime.now(timezone.utc) - self.expires
        with self.engine.connect() as conn:
            row = conn.execute(select(self.table.c.owner).where(
                self.table.c.task_id == task_id, self.table.c.created >= cutoff)).first()
        return None if row is None else str(row[0])


class TaskOwners:
    def __init__(self, client: redis.Redis, expires_s: int, result_backend: str = "") -> None:
        self.redis = client
        self.expires_s = expires_s
        url = database_url(result_backend)
        self.db = _DatabaseOwners(url, expires_s) if url else None

    @staticmethod
    def key(task_id: str) -> str:
        return OWNER_PREFIX + task_id

    def record(self, task_id: str, digest: str) -> None:
        """Record the owner (raises RedisError or OwnershipUnavailable)."""
        if self.db is not None:
            self._db_call(self.db.record, task_id, digest)
        self.redis.set(self.key(task_id), digest, ex=self.expires_s)

    def owner(self, task_id: str) -> str | None:
        """The owner's key digest, or None (raises RedisError or OwnershipUnavailable)."""
        value = self.redis.get(self.key(task_id))
        if value is not None:
            return value.decode()
        if self.db is None:
            return None
        return self._db_call(self.db.owner, task_id)  # type: ignore[no-any-return]

    @staticmethod
    def _db_call(fn: Any, *args: Any) -> Any:
        from sqlalchemy.exc import SQLAlchemyError

        try:
            return fn(*args)
        except SQLAlchemyError as exc:
            log.warning("task ownership database unavailable: %s", exc)
            raise OwnershipUnavailable(f"database: {type(exc).__name__}") from exc
