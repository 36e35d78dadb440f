"""Start and supervise the service's processes (Redis if needed, API, worker, Flower).

The commands are the Procfile's; this only adds "start Redis if none answers"
and "stop everything together".
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import redis

from imagegenx.redis_client import is_sentinel, redis_client
from imagegenx.settings import Settings

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


class LaunchError(RuntimeError):
    """A process could not be started; the message says what to do."""


def redis_answers(url: str, timeout: float = 0.5, sentinel_master: str = "") -> bool:
    try:
        return bool(redis_client(url, sentinel_master, socket_connect_timeout=timeout,
                                 socket_timeout=timeout).ping())
    except redis.RedisError:
        return False


def redis_command(url: str) -> list[str] | None:
    """Command that starts a throwaway Redis for ``url``, or None if not local."""
    parts = urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    if is_sentinel(url) or host not in LOOPBACK:
        return None
    binary = shutil.which("redis-server")
    if binary is None:
        raise LaunchError("no Redis answers at %s and redis-server is not installed "
                          "(install it, e.g. `apt-get install redis-server`)" % url)
    return [binary, "--bind", "127.0.0.1", "--port", str(parts.port or 6379),
            "--save", "", "--appendonly", "no"]


GUNICORN_CONFIG = "python:imagegenx.api.gunicorn_conf"


def api_command(s: Settings) -> list[str]:
    """gunicorn with the API's serving configuration (gevent workers), bound as configured."""
    return [sys.executable, "-m", "gunicorn", "--config", GUNICORN_CONFIG,
            "--bind", f"{s.api_host}:{s.api_port}", "imagegenx.api:create_app()"]


def worker_command(hostname: str = "cpu0@%h", loglevel: str = "INFO") -> list[str]:
    return [sys.executable, "-m", "celery", "-A", "tasks", "worker",
            "--loglevel", loglevel, "--hostname", hostname]


def count_gpus() -> int | None:
    """GPUs on this machine, from ``nvidia-smi -L``; None when it cannot tell.

    The parent of the GPU workers never touches CUDA (a CUDA context must not
    live in a process that starts workers), so it asks the driver's tool.
    """
    binary = shutil.which("nvidia-smi")
    if binary is None:
        return None
    try:
        out = subprocess.run([binary, "-L"], capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return sum(1 for line in out.splitlines() if line.startswith("GPU "))


def parse_gpus(spec: str, available: int | None) -> list[int]:
    """GPU indices from ``all`` or a comma-separated list such as ``0,1``.

    ``available`` is the number of GPUs (None if unknown: indices are then
    taken as given). Raises ValueError with a message fit for the user.
    """
    text = spec.strip().lower()
    if text == "all":
        if available is None:
            raise ValueError("cannot count the GPUs (nvidia-smi not found or failing); "
                             "list their indices instead, e.g. 0,1")
        if available == 0:
            raise ValueError("no GPU found (nvidia-smi -L lists none)")
        return list(range(available))
    parts = [p.strip() for p in text.split(",")]
    if not text or any(not p for p in parts):
        raise ValueError(f"expected 'all' or comma-separated GPU indices such as 0,1, got {spec!r}")
    indices: list[int] = []
    for part in parts:
        if not part.isdigit():
            raise ValueError(f"{part!r} is not a GPU index (expected 'all' or indices such as 0,1)")
        index = int(part)
        if available is not None and index >= available:
            have = f"GPUs 0 to {available - 1}" if available else "no GPU"
            raise ValueError(f"GPU {index} does not exist (this machine has {have})")
        if index in indices:
            raise ValueError(f"GPU {index} is listed twice")
        indices.append(index)
    return indices


def gpu_worker_env(env: dict[str, str], index: int) -> dict[str, str]:
    """The environment of the worker pinned to GPU ``index``: it sees that GPU alone."""
    return {**env, "CUDA_VISIBLE_DEVICES": str(index)}


def worker_metrics_port(base: int, index: int) -> int:
    """Prometheus port of the worker on GPU ``index``: the base port + the index (0 stays off)."""
    return base + index if base else 0


def flower_command(port: int) -> list[str]:
    """Flower on loopback; its basic auth comes from ``flower_env``, never the command line."""
    return [sys.executable, "-m", "celery", "-A", "tasks", "flower", "--address=127.0.0.1",
            f"--port={port}"]


def flower_env(env: dict[str, str], auth: str) -> dict[str, str]:
    """Flower's environment: it reads ``FLOWER_BASIC_AUTH`` itself, so ``ps`` does not show it."""
    return {**env, "FLOWER_BASIC_AUTH": auth}


def kept_secret(path: Path, make: Callable[[], str]) -> str:
    """The secret kept in ``path``, written once by ``make`` (mode 0600 from the start),
    so it stays the same across restarts."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(make() + "\n")
    return path.read_text().strip()


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


@dataclass
class Supervisor:
    """Runs named child processes; stops all of them when one exits or on a signal.

    Each child leads its own process group, so stopping reaches its children
    too (gunicorn's workers). A signal only sets a flag: stopping runs once,
    with further signals ignored, whatever their number and order (make
    forwards one of its own), and returns only when every group is gone.

    A child that exits with one of ``restart_codes`` is started again alone, at
    most ``max_restarts`` times in ``restart_window_s`` (then everything stops):
    a GPU worker exits with 70 when its device was lost (``workers.runtime``), and
    the other GPUs' workers go on serving meanwhile.
    """

    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    stop_requested: bool = False
    restart_codes: frozenset[int] = frozenset()
    max_restarts: int = 3
    restart_window_s: float = 600.0
    restarts: dict[str, list[float]] = field(default_factory=dict)  # when each child was started again
    _commands: dict[str, tuple[list[str], dict[str, str] | None]] = field(default_factory=dict)
    _stopped: bool = False

    def trap_signals(self) -> None:
        """From now on SIGTERM, SIGINT and SIGHUP ask for a stop instead of killing this process."""
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._request_stop)

    def _request_stop(self, _signum: int, _frame: object) -> None:
        self.stop_requested = True

    def spawn(self, name: str, cmd: list[str], env: dict[str, str] | None = None) -> None:
        if self.stop_requested:
            return  # asked to stop while starting: start nothing more
        self._commands[name] = (cmd, env)
        self.procs[name] = subprocess.Popen(cmd, env=env, start_new_session=True)

    def wait(self) -> int:
        self.trap_signals()
        try:
            while not self.stop_requested:
                for name, proc in list(self.procs.items()):
                    code = proc.poll()
                    if code is None:
                        continue
                    if self._may_restart(name, code):
                        _wait_group(proc, time.monotonic() + 30)  # its own children first
                        cmd, env = self._commands[name]
                        self.spawn(name, cmd, env)
                        continue
                    print(f"imagegenx: {name} exited with {code}; stopping", file=sys.stderr)
                    return code or 1
                time.sleep(0.1)
            return 0
        finally:
            self.stop_all()

    def _may_restart(self, name: str, code: int) -> bool:
        """Whether ``name``, which exited with ``code``, is started again (and counted)."""
        if code not in self.restart_codes or name not in self._commands:
            return False
        now = time.monotonic()
        recent = [t for t in self.restarts.get(name, []) if now - t < self.restart_window_s]
        if len(recent) >= self.max_restarts:
            print(f"imagegenx: {name} exited with {code} again: {len(recent)} restarts in "
                  f"{self.restart_window_s:.0f} s already", file=sys.stderr)
            return False
        self.restarts[name] = recent + [now]
        print(f"imagegenx: {name} exited with {code}; starting it again "
              f"({len(recent) + 1} of {self.max_restarts} in {self.restart_window_s:.0f} s)",
              file=sys.stderr)
        return True

    def stop_all(self, timeout: float = 30.0) -> None:
        """SIGTERM every process group, SIGKILL those left after ``timeout``; once only."""
        if self._stopped:
            return
        previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in STOP_SIGNALS}
        try:
            for proc in reversed(list(self.procs.values())):
                _signal_group(proc, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            for proc in self.procs.values():
                if not _wait_group(proc, deadline):
                    _signal_group(proc, signal.SIGKILL)
                    _wait_group(proc, time.monotonic() + 5)
            self._stopped = True
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def _signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    """Signal the process group ``proc`` leads (its leader may have exited already)."""
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _wait_group(proc: subprocess.Popen[bytes], deadline: float) -> bool:
    """Wait until the leader and every other member of its group are gone."""
    while True:
        proc.poll()
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            pass
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
