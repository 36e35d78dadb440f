"""The launcher's supervisor starts a GPU worker that lost its device (exit 70)
again, alone, while its siblings keep running, up to a limit; any other exit, or
one restart too many, stops everything as before. Real child processes."""
from __future__ import annotations

import os
import sys

import pytest

from imagegenx.launcher import Supervisor

LOSES_ITS_DEVICE = [sys.executable, "-c", f"import sys, time; time.sleep(0.2); sys.exit({os.EX_SOFTWARE})"]
SERVES = [sys.executable, "-c", "import time; time.sleep(60)"]


@pytest.fixture
def sup() -> Supervisor:
    s = Supervisor(restart_codes=frozenset({os.EX_SOFTWARE}), max_restarts=2, restart_window_s=60.0)
    s.trap_signals = lambda: None  # type: ignore[method-assign]  # not pytest's signals
    return s


def test_a_worker_that_lost_its_device_is_started_again_alone_up_to_the_limit(
        sup: Supervisor, capsys: pytest.CaptureFixture[str]) -> None:
    sup.spawn("gpu0", SERVES)
    sup.spawn("gpu1", LOSES_ITS_DEVICE)
    sibling = sup.procs["gpu0"]
    assert sup.wait() == os.EX_SOFTWARE  # the third exit in the window stops everything
    assert len(sup.restarts["gpu1"]) == 2 and "gpu0" not in sup.restarts
    assert sup.procs["gpu0"] is sibling  # never restarted, stopped only at the end
    assert sibling.returncode is not None
    err = capsys.readouterr().err
    assert "gpu1 exited with 70; starting it again (1 of 2 in 60 s)" in err
    assert "gpu1 exited with 70 again: 2 restarts in 60 s already" in err
    assert "gpu1 exited with 70; stopping" in err


def test_any_other_exit_stops_everything_at_once(sup: Supervisor) -> None:
    sup.spawn("gpu0", SERVES)
    sup.spawn("gpu1", [sys.executable, "-c", "import sys; sys.exit(3)"])
    assert sup.wait() == 3
    assert sup.restarts == {}
    assert sup.procs["gpu0"].returncode is not None


def test_without_restart_codes_nothing_is_restarted() -> None:
    s = Supervisor()
    s.trap_signals = lambda: None  # type: ignore[method-assign]
    s.spawn("api", LOSES_ITS_DEVICE)
    assert s.wait() == os.EX_SOFTWARE and s.restarts == {}
