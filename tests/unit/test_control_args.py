"""`celery -A tasks control set_batching` with arguments that are not numbers."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from workers.control import set_batching

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(("args", "named"), [(["abc"], "'max_batch'"), (["8", "soon"], "'max_wait_ms'")])
def test_the_celery_cli_names_the_bad_argument_in_one_line(args: list[str], named: str) -> None:
    # The CLI converts the arguments before it contacts any worker.
    done = subprocess.run([sys.executable, "-m", "celery", "-A", "tasks", "control", "set_batching", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert f"Error: Invalid value for {named}: " in done.stderr


@pytest.mark.parametrize(("kwargs", "reason"), [
    ({"max_batch": "abc"}, "max_batch must be a number, got 'abc'"),
    ({"max_batch": True}, "max_batch must be a number, got True"),
    ({"max_wait_ms": "30"}, "max_wait_ms must be a number, got '30'"),
])
def test_a_broadcast_from_python_with_text_gets_an_error_reply(kwargs: dict[str, object], reason: str) -> None:
    assert set_batching(None, **kwargs) == {"error": reason}
