"""The multi-host test's network helpers: subnet choice and the skip reason."""
from __future__ import annotations

import ipaddress
import os

import pytest

from tests.integration import netns


def test_free_subnet_avoids_every_taken_prefix() -> None:
    taken = ["10.64.0.0/11", "10.128.0.0/9", "192.0.2.0/24"]  # free: 10.96.0.0/11
    for _ in range(50):
        net = netns.free_subnet(taken)
        assert net.prefixlen == 24 and net.subnet_of(ipaddress.ip_network("10.96.0.0/11")), net


def test_free_subnet_gives_up_when_all_are_taken() -> None:
    with pytest.raises(RuntimeError, match="no free"):
        netns.free_subnet(["10.0.0.0/8"])


def test_not_root_is_a_skip_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert "needs root" in (netns.netns_unavailable() or "")


def test_missing_ip_command_is_a_skip_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(netns.shutil, "which", lambda name: None)
    assert "iproute2" in (netns.netns_unavailable() or "")
