"""`imagegenx up` (what `make run` runs) stops everything on any burst of signals,
and its API keeps answering while slow clients hold connections half-open."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from tests.service import free_port

pytestmark = pytest.mark.integration


@dataclass
class Up:
    proc: subprocess.Popen[bytes]
    base: str
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def descendants(pid: int) -> set[int]:
    """Every live process below ``pid``, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    """Running (not gone, not a zombie waiting to be reaped)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.fixture
def up(redis_base: str, tmp_path: Path) -> Iterator[Up]:
    api_port, flower_port = free_port(), free_port()
    env = {**os.environ, "IMAGEGENX_BROKER_URL": f"{redis_base}/3",
           "IMAGEGENX_RESULT_BACKEND": f"{redis_base}/3", "IMAGEGENX_ENGINE": "synthetic",
           "IMAGEGENX_QUEUE": f"stop-{uuid.uuid4().hex[:6]}", "IMAGEGENX_API_PORT": str(api_port),
           "IMAGEGENX_FLOWER_PORT": str(flower_port), "IMAGEGENX_FLOWER_AUTH": "ops:secret",
           "IMAGEGENX_WORKER_METRICS_PORT": "0", "IMAGEGENX_API_KEYS": "stop-key"}
    log = tmp_path / "up.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "imagegenx.cli", "up"], cwd=tmp_path, env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    running = Up(proc, f"http://127.0.0.1:{api_port}", log)
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, running.output()
            try:
                if requests.get(f"{running.base}/healthz", timeout=1).status_code == 200:
                    break
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline, running.output()
            time.sleep(0.3)
        yield running
    finally:
        for pid in descendants(proc.pid) | {proc.pid}:
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        proc.wait(10)


@pytest.mark.parametrize("signals", [
    (signal.SIGTERM, signal.SIGTERM),
    (signal.SIGINT, signal.SIGTERM, signal.SIGINT),
    (signal.SIGTERM, signal.SIGINT, signal.SIGTERM, signal.SIGTERM),
])
def test_any_burst_of_signals_stops_every_process(up: Up, signals: tuple[int, ...]) -> None:
    children = descendants(up.proc.pid)
    assert len(children) >= 5, children  # gunicorn master + 2 workers, worker, flower
    for sig in signals:  # as make forwards its own signal after the group's
        os.killpg(up.proc.pid, sig)
        time.sleep(0.1)
    up.proc.wait(60)
    left = sorted(pid for pid in children if alive(pid))
    assert not left, (left, up.output())
    with pytest.raises(requests.RequestException):
        requests.get(f"{up.base}/healthz", timeout=1)


def test_api_answers_while_50_connections_are_held_half_open(up: Up) -> None:
    host, port = up.base.removeprefix("http://").split(":")
    held = []
    try:
        for _ in range(50):
            s = socket.create_connection((host, int(port)), timeout=5)
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # headers never finished
            held.append(s)
        time.sleep(0.5)
        r = requests.get(f"{up.base}/api/v1/tasks/{uuid.uuid4()}", headers={"X-API-Key": "stop-key"},
                         timeout=10)
        assert r.status_code == 404 and r.json()["error"]
        # Health checks keep answering too; each API process pings the workers on its
        # own first check, so one may answer 503 until its first ping comes back.
        codes = []
        deadline = time.monotonic() + 10
        while not codes or (codes[-1] != 200 and time.monotonic() < deadline):
            health = requests.get(f"{up.base}/healthz", timeout=10)
            assert health.json()["redis"] is True
            codes.append(health.status_code)
            time.sleep(0.2)
        assert codes[-1] == 200, codes
    finally:
        for s in held:
            s.close()
