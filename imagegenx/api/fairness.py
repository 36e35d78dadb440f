"""Fair share between API keys at submission: each key's highest priority (422)
and its most unfinished tasks (429).

The count of unfinished tasks is kept by the API alone, so it needs nothing
from the worker's finishing path: a Redis sorted set per key
(``imagegenx:unfinished:<key digest>``) holds the key's task ids scored by when
their results expire. A submission adds its task and counts; only when the count
passes the cap does it read the tasks' states from the result backend and drop
the finished ones (SUCCESS, FAILURE, REVOKED), then count again. Entries past
the results' lifetime are dropped by score (their state can no longer be read).
Adding before counting means concurrent submissions never overshoot the cap.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from celery import states
from redis import Redis

from imagegenx.api.errors import ApiError
from imagegenx.settings import Settings

PREFIX = "imagegenx:unfinished:"


def refuse_priority(priority: int, digest: str, settings: Settings) -> None:
    """422 naming ``priority`` when it is above what this key may ask for."""
    cap = settings.priority_cap(digest)
    if priority > cap:
        raise ApiError(422, "invalid request", fields=[{
            "field": "priority",
            "reason": f"at most {cap} for this API key (key_max_priority)"}])


def finished(task_ids: Iterable[str], state_of: Callable[[str], str]) -> list[str]:
    """The tasks whose state is final."""
    return [t for t in task_ids if state_of(t) in states.READY_STATES]


class UnfinishedTasks:
    """Each key's unfinished tasks, capped, in the API's Redis."""

    def __init__(self, client: Redis, state_of: Callable[[str], str], cap: int,
                 lifetime_s: int) -> None:
        self.redis = client
        self.state_of = state_of
        self.cap = cap
        self.lifetime_s = lifetime_s

    @staticmethod
    def key(digest: str) -> str:
        return PREFIX + digest

    def admit(self, digest: str, task_id: str, retry_after_s: int,
              now: float | None = None) -> None:
        """Count ``task_id`` against the key, or raise 429 with Retry-After."""
        if not self.cap:
            return
        now = time.time() if now is None else now
        name = self.key(digest)
        pipe = self.redis.pipeline()
        pipe.zremrangebyscore(name, "-inf", now)
        pipe.zadd(name, {task_id: now + self.lifetime_s})
        pipe.expire(name, self.lifetime_s)
        pipe.zcard(name)
        count = pipe.execute()[-1]
        if count <= self.cap:
            return
        others = [m.decode() for m in self.redis.zrange(name, 0, -1) if m.decode() != task_id]
        done = finished(others, self.state_of)
        if done:
            self.redis.zrem(name, *done)
        count = self.redis.zcard(name)
        if count <= self.cap:
            return
        self.redis.zrem(name, task_id)
        raise ApiError(429, f"too many unfinished tasks for this API key: {count - 1} are queued "
                            f"or running (limit {self.cap}); retry when one finishes",
                       headers={"Retry-After": str(retry_after_s)}, unfinished=count - 1,
                       max_unfinished=self.cap, retry_after_s=retry_after_s)

    def forget(self, digest: str, task_id: str) -> None:
        """Uncount a task that was never queued."""
        if self.cap:
            self.redis.zrem(self.key(digest), task_id)
