"""Hosts on one machine: each a Linux network namespace, all joined by one switch.

The switch is a bridge in a namespace of its own; every host (and this process, from
the root namespace) has one veth link to a port of it, so taking a port down cuts that
host off the network the way a pulled cable or a failed switch port does: packets are
dropped, nothing is refused, and the host's own interface stays configured.

Names carry this process's id and a random token, so parallel runs never collide;
``lan()`` removes every process, namespace and link it made, on failure too, and
first removes what a killed earlier run left behind.
"""
from __future__ import annotations

import ipaddress
import os
import re
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

PREFIX = "igx"
_STALE = re.compile(rf"^{PREFIX}-(\d+)-[0-9a-f]+-")


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


def netns_unavailable() -> str | None:
    """Why network namespaces cannot be used here (None: they can)."""
    if os.geteuid() != 0:
        return "needs root: it creates network namespaces and veth links (ip netns)"
    if shutil.which("ip") is None:
        return "needs the ip command (iproute2) for network namespaces"
    probe = f"{PREFIX}-{os.getpid()}-{secrets.token_hex(3)}-probe"
    added = _ip("netns", "add", probe, check=False)
    if added.returncode != 0:
        return f"ip netns is unavailable: {added.stderr.strip() or added.returncode}"
    _ip("netns", "del", probe, check=False)
    return None


def free_subnet(taken: Sequence[str]) -> ipaddress.IPv4Network:
    """A random 10.x.y.0/24 that overlaps none of the ``taken`` prefixes."""
    used = [ipaddress.ip_network(p, strict=False) for p in taken]
    for _ in range(1000):
        net = ipaddress.ip_network(f"10.{secrets.randbelow(190) + 64}.{secrets.randbelow(256)}.0/24")
        if not any(net.overlaps(u) for u in used):
            return net
    raise RuntimeError("no free 10.x.y.0/24 subnet for the test network")


def _root_prefixes() -> list[str]:
    out = _ip("-4", "route", "show", "table", "all").stdout
    return [line.split()[0] for line in out.splitlines()
            if line and line.split()[0][0].isdigit()]


@dataclass
class Host:
    """One host: its namespace, its address, and the switch port it is plugged into."""

    role: str
    ns: str
    addr: str
    port: str

    def argv(self, command: Sequence[str]) -> list[str]:
        """``command`` run inside this host."""
        return ["ip", "netns", "exec", self.ns, *command]


@dataclass
class Lan:
    """A switch with hosts on it; this process reaches them from the root namespace."""

    token: str
    subnet: ipaddress.IPv4Network
    switch: str
    root_link: str
    hosts: dict[str, Host] = field(default_factory=dict)
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def spawn(self, host: Host, command: Sequence[str], log: Path,
              env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.Popen[bytes]:
        """Start ``command`` inside ``host``; its output goes to ``log``."""
        with log.open("ab") as fh:
            proc = subprocess.Popen(host.argv(command), env=env, cwd=cwd, stdout=fh,
                                    stderr=subprocess.STDOUT)
        self.procs.append(proc)
        return proc

    def cut(self, host: Host) -> None:
        """Take the host's switch port down: its packets are dropped from now on."""
        _ip("-n", self.switch, "link", "set", host.port, "down")

    def restore(self, host: Host) -> None:
        _ip("-n", self.switch, "link", "set", host.port, "up")


def _add_host(lan: Lan, role: str, index: int) -> Host:
    ns = f"{PREFIX}-{os.getpid()}-{lan.token}-{role}"
    addr = str(lan.subnet.network_address + index)
    port = f"p{index}"
    _ip("netns", "add", ns)
    host = Host(role, ns, addr, port)
    lan.hosts[role] = host  # registered before anything else can fail: cleaned up
    _ip("link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", port, "netns", lan.switch)
    _ip("-n", lan.switch, "link", "set", port, "master", "br0", "up")
    _ip("-n", ns, "addr", "add", f"{addr}/{lan.subnet.prefixlen}", "dev", "eth0")
    _ip("-n", ns, "link", "set", "eth0", "up")
    _ip("-n", ns, "link", "set", "lo", "up")
    return host


def _kill_namespace(ns: str) -> None:
    """SIGKILL the processes inside ``ns`` (all started by a run of this module), then delete it."""
    pids = _ip("netns", "pids", ns, check=False).stdout.split()
    for pid in pids:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass
    _ip("netns", "del", ns, check=False)


def _remove_stale() -> None:
    """Remove the namespaces of earlier runs whose process is gone (killed before cleanup)."""
    for line in _ip("netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        m = _STALE.match(name)
        if m is None or int(m.group(1)) == os.getpid():
            continue
        try:
            os.kill(int(m.group(1)), 0)
        except ProcessLookupError:
            _kill_namespace(name)


@contextmanager
def lan(roles: Sequence[str]) -> Iterator[Lan]:
    """A switch, one host per role (addresses .1, .2, ... in role order) and a link
    from the root namespace (address .254); everything is removed on exit."""
    _remove_stale()
    token = secrets.token_hex(3)
    net = Lan(token=token, subnet=free_subnet(_root_prefixes()),
              switch=f"{PREFIX}-{os.getpid()}-{token}-switch", root_link=f"{PREFIX}{token}r")
    try:
        _ip("netns", "add", net.switch)
        _ip("-n", net.switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", net.switch, "link", "set", "br0", "up")
        for index, role in enumerate(roles, start=1):
            _add_host(net, role, index)
        _ip("link", "add", net.root_link, "type", "veth", "peer", "name", "uplink",
            "netns", net.switch)
        _ip("-n", net.switch, "link", "set", "uplink", "master", "br0", "up")
        _ip("addr", "add", f"{net.subnet.network_address + 254}/{net.subnet.prefixlen}",
            "dev", net.root_link)
        _ip("link", "set", net.root_link, "up")
        yield net
    finally:
        for proc in net.procs:
            if proc.poll() is None:
                proc.kill()
        for proc in net.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
        for host in net.hosts.values():
            _kill_namespace(host.ns)
        _kill_namespace(net.switch)
        # Namespaces are torn down asynchronously: remove the root end at once.
        _ip("link", "del", net.root_link, check=False)


def wait_port(addr: str, port: int, timeout: float, proc: subprocess.Popen[bytes] | None = None,
              what: str = "") -> None:
    """Wait until ``addr:port`` accepts TCP connections (from this process's namespace)."""
    import socket

    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what or proc.args} exited ({proc.returncode})")
        try:
            with socket.create_connection((addr, port), timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what or f'{addr}:{port}'} not reachable after {timeout} s") from None
            time.sleep(0.05)
