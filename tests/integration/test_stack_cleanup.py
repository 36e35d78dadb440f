"""The test stacks leave nothing of their queues in Redis: not even kombu's bindings."""
from __future__ import annotations

from pathlib import Path

import pytest
import requests

from imagegenx.redis_client import redis_client
from tests.integration.fault_stack import fault_service
from tests.integration.stack import running_stack

pytestmark = pytest.mark.integration


def leftovers(redis_base: str, queue: str) -> list[bytes]:
    client = redis_client(f"{redis_base}/3")
    return sorted(k for pattern in (queue, f"{queue}.*", f"_kombu.binding*.{queue}", f"_kombu.binding*.{queue}.*")
                  for k in client.keys(pattern))


def test_running_stack_removes_its_queues_and_their_bindings(redis_base: str, tmp_path: Path) -> None:
    with running_stack(redis_base, tmp_path, None, name="cleanup",
                       IMAGEGENX_ENGINE="synthetic") as stack:
        stack.submit({"prompt": "x", "seed": 1})  # the API declares the queue too
        queue = stack.settings.queue
        assert leftovers(redis_base, queue)  # the worker's bindings exist while it runs
    assert leftovers(redis_base, queue) == []


def test_fault_service_removes_its_queue_and_its_bindings(redis_base: str, tmp_path: Path) -> None:
    with fault_service(redis_base, tmp_path) as service:
        r = requests.post(f"{service.api.base}/api/v1/images", json={"prompt": "x"},
                          headers={"X-API-Key": "test-key-0123456789"}, timeout=10)
        assert r.status_code == 202, r.text
        queue = service.settings.queue
        assert leftovers(redis_base, queue)
    assert leftovers(redis_base, queue) == []
