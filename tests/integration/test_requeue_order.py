"""Requests a stopping (or faulted) worker gives back keep their order on Redis:
the oldest is taken first again. kombu restores a message to the end of the
list that consumers take from next, so each restored message goes in front of
the one restored before it; the worker restores the newest first."""
from __future__ import annotations

import uuid

import pytest
from kombu import Connection

from workers.bootstep import _requeue

pytestmark = pytest.mark.integration


class Delivery:
    """What ``_requeue`` reads of a Celery request."""

    def __init__(self, message: object) -> None:
        self.message = message
        self.id = uuid.uuid4().hex
        self.acknowledged = False
        self.events: list[str] = []

    def send_event(self, name: str, **_: object) -> None:
        self.events.append(name)


class Held:
    def __init__(self, message: object) -> None:
        self.delivery = Delivery(message)


def test_given_back_messages_are_taken_again_oldest_first(redis_base: str) -> None:
    queue = f"requeue-order-{uuid.uuid4().hex[:8]}"
    with Connection(f"{redis_base}/5") as conn:
        q = conn.SimpleQueue(queue)
        try:
            for body in ("first", "second", "third", "fourth"):
                q.put(body)
            taken = [q.get(timeout=5) for _ in range(4)]  # held, not acknowledged
            assert [m.payload for m in taken] == ["first", "second", "third", "fourth"]
            q.put("arrived meanwhile")

            _requeue([Held(m) for m in taken])  # oldest first, as runner.close() returns them

            again = []
            for _ in range(5):
                m = q.get(timeout=5)
                again.append(m.payload)
                m.ack()
            assert again == ["first", "second", "third", "fourth", "arrived meanwhile"]
        finally:
            q.clear()
            q.close()
