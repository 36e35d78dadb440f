"""Redis result backends whose writes never replace a stored SUCCESS, nor a final
state with a running one, atomically.

Celery's key-value backends read a task's state and then write the new one: two
round trips. A worker cut off from Redis between them (a network partition, a
paused process) keeps its write and retries it (the backend's ``ensure``) until the
network is back. By then the task's messages have been delivered again, and another
worker has stored its SUCCESS, which the late write then replaced (found by
tests/integration/test_multihost_partition.py). Here the check and the write are
one Redis transaction (WATCH/MULTI/EXEC), and every retry checks again.

A final state (SUCCESS, FAILURE, REVOKED) is also never replaced by a state of a
task still under way (STARTED, PROGRESS, ...): the API marks a revoked task
REVOKED at once, and a worker that has not yet received the revoke stores one
more PROGRESS before it stops at the next step; that write turned the revoked
task back into PROGRESS for a step, and the event stream's final ``revoked``
event carried it (found by tests/integration/test_task_events.py).

``celery_config`` names these classes in ``result_backend`` for redis://,
rediss:// and sentinel:// URLs (``module:Class+url``).
"""
from __future__ import annotations

from typing import Any

from celery import states
from celery.backends.redis import RedisBackend, SentinelBackend
from celery.exceptions import BackendStoreError
from kombu.utils.encoding import bytes_to_str


class _SuccessStays:
    """Mixin for ``RedisBackend``: a task's state is written only while it is not SUCCESS,
    and a running state only while the task has no final one."""

    def _store_result(self, task_id: Any, result: Any, state: str, traceback: Any = None,
                      request: Any = None, **kwargs: Any) -> Any:
        backend: Any = self
        meta = backend._get_result_meta(result=result, state=state, traceback=traceback,
                                        request=request)
        meta["task_id"] = bytes_to_str(task_id)
        expires = getattr(backend, "failure_expires", None) if state == states.FAILURE else None
        value = backend.encode(meta)
        if isinstance(value, str) and len(value) > backend._MAX_STR_VALUE_SIZE:
            raise BackendStoreError("value too large for Redis backend", state=state, task_id=task_id)
        backend.ensure(self._set_guarded,
                       (backend.get_key_for_task(task_id), value, state, expires))
        return result

    def _set_guarded(self, key: bytes | str, value: Any, state: str, expires: int | None) -> bool:
        """Write ``value`` (of ``state``) unless ``may_replace`` forbids it; True if written."""
        backend: Any = self
        ttl = expires if expires is not None else backend.expires

        def write(pipe: Any) -> bool:
            current = pipe.get(key)
            if current is not None and not may_replace(backend.decode_result(current).get("status"), state):
                return False
            pipe.multi()
            if ttl:
                pipe.setex(key, ttl, value)
            else:
                pipe.set(key, value)
            pipe.publish(key, value)
            return True

        # Re-runs ``write`` if the key changes between the read and EXEC.
        return bool(backend.client.transaction(write, key, value_from_callable=True))


def may_replace(stored: str | None, state: str) -> bool:
    """Whether a write of ``state`` may replace a stored ``stored`` state."""
    if stored == states.SUCCESS:
        return False
    return not (stored in states.READY_STATES and state not in states.READY_STATES)


class GuardedRedisBackend(_SuccessStays, RedisBackend):
    """``redis://`` and ``rediss://`` result backend; see the module docstring."""


class GuardedSentinelBackend(_SuccessStays, SentinelBackend):
    """``sentinel://`` result backend; see the module docstring."""


def backend_url(url: str) -> str:
    """``result_backend`` for ``url``: Redis URLs get the guarded class, others stay."""
    scheme = url.partition("://")[0]
    if scheme in ("redis", "rediss"):
        return f"{__name__}:GuardedRedisBackend+{url}"
    if scheme == "sentinel":
        return f"{__name__}:GuardedSentinelBackend+{url}"
    return url
