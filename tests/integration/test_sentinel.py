"""Redis Sentinel: broker, result backend and the service's own keys follow the
master that Sentinel names (sentinel:// URLs + IMAGEGENX_SENTINEL_MASTER)."""
from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import requests

from imagegenx.redis_client import parse_sentinel, redis_client
from tests.integration.stack import API_KEY, running_stack
from tests.service import free_port, wait_task

pytestmark = pytest.mark.integration
MASTER = "imagegenx-master"


def test_parse_sentinel_urls() -> None:
    hosts, db, password = parse_sentinel("sentinel://:pw@10.0.0.1:26379;sentinel://10.0.0.2/5")
    assert hosts == [("10.0.0.1", 26379), ("10.0.0.2", 26379)]
    assert (db, password) == (5, "pw")


@pytest.fixture(scope="module")
def sentinel_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("needs redis-server (it runs Sentinel too)")
    tmp = tmp_path_factory.mktemp("sentinel")
    master_port, sentinel_port = free_port(), free_port()
    conf = tmp / "sentinel.conf"
    conf.write_text(f"port {sentinel_port}\nbind 127.0.0.1\ndir {tmp}\n"
                    f"sentinel monitor {MASTER} 127.0.0.1 {master_port} 1\n")
    procs = [
        subprocess.Popen([binary, "--bind", "127.0.0.1", "--port", str(master_port), "--save", "",
                          "--appendonly", "no"], stdout=subprocess.DEVNULL),
        subprocess.Popen([binary, str(conf), "--sentinel"], stdout=subprocess.DEVNULL),
    ]
    try:
        sentinel = redis.Redis(port=sentinel_port)
        deadline = time.monotonic() + 10
        while True:
            try:
                if sentinel.execute_command("SENTINEL", "get-master-addr-by-name", MASTER):
                    break
            except redis.RedisError:
                pass
            assert time.monotonic() < deadline, "sentinel did not start"
            time.sleep(0.1)
        yield f"sentinel://127.0.0.1:{sentinel_port}/2"
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(10)


def test_full_request_through_sentinel(sentinel_url: str, redis_base: str, tiny_model: Path,
                                       tmp_path: Path) -> None:
    client = redis_client(sentinel_url, MASTER)
    assert client.ping()
    with running_stack(redis_base, tmp_path, tiny_model, name="sentinel",
                       IMAGEGENX_BROKER_URL=sentinel_url, IMAGEGENX_RESULT_BACKEND=sentinel_url,
                       IMAGEGENX_SENTINEL_MASTER=MASTER) as stack:
        r = requests.post(f"{stack.base}/api/v1/images", json={"prompt": "via sentinel", "seed": 9},
                          headers=stack.headers, timeout=5)
        assert r.status_code == 202, r.text
        task_id = r.json()["task_id"]
        assert wait_task(stack.base, task_id, API_KEY, 60)["state"] == "SUCCESS"
        assert client.exists(f"celery-task-meta-{task_id}")  # stored on the Sentinel's master
        health = requests.get(f"{stack.base}/healthz", timeout=5).json()
        assert health["redis"] is True and stack.worker.hostname in health["workers"]
