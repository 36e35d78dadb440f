"""`imagegenx up` without starting anything: what it prints, keeps and passes on."""
from __future__ import annotations

import stat
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from imagegenx import cli, launcher


def run_up(monkeypatch: pytest.MonkeyPatch, data_dir: Path) -> tuple[Result, dict[str, tuple[list[str], dict[str, str]]]]:
    spawned: dict[str, tuple[list[str], dict[str, str]]] = {}
    monkeypatch.setattr(launcher.Supervisor, "spawn",
                        lambda self, name, cmd, env=None: spawned.__setitem__(name, (cmd, env or {})))
    monkeypatch.setattr(launcher.Supervisor, "wait", lambda self: 0)
    monkeypatch.setattr(launcher.Supervisor, "trap_signals", lambda self: None)  # not pytest's
    monkeypatch.setattr(launcher, "redis_answers", lambda *a, **k: True)
    monkeypatch.setenv("IMAGEGENX_DATA_DIR", str(data_dir))
    monkeypatch.setenv("IMAGEGENX_API_PORT", "8123")
    result = CliRunner().invoke(cli.main, ["up", "--no-worker"])
    assert result.exit_code == 0, result.output
    return result, spawned


def test_up_prints_the_playground_and_api_docs_addresses(
        clean_env: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    result, _ = run_up(monkeypatch, tmp_path)
    assert "Playground: http://127.0.0.1:8123/\n" in result.output
    assert "API docs: http://127.0.0.1:8123/api/v1/docs\n" in result.output
    assert "API: http://127.0.0.1:8123/api/v1/images\n" in result.output


def test_flower_password_is_kept_private_and_stays_off_the_command_line(
        clean_env: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _, first = run_up(monkeypatch, tmp_path)
    auth_file = tmp_path / "flower-auth"
    assert stat.S_IMODE(auth_file.stat().st_mode) == 0o600
    auth = auth_file.read_text().strip()
    assert auth.startswith("admin:") and len(auth) > len("admin:") + 8
    cmd, env = first["flower"]
    assert env["FLOWER_BASIC_AUTH"] == auth
    assert not any(auth.split(":")[1] in arg for arg in cmd)
    _, second = run_up(monkeypatch, tmp_path)
    assert second["flower"][1]["FLOWER_BASIC_AUTH"] == auth  # the same on every start


def test_flower_auth_from_the_environment_wins(
        clean_env: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("IMAGEGENX_FLOWER_AUTH", "ops:secret")
    _, spawned = run_up(monkeypatch, tmp_path)
    assert spawned["flower"][1]["FLOWER_BASIC_AUTH"] == "ops:secret"
    assert not (tmp_path / "flower-auth").exists()
