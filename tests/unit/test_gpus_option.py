"""`imagegenx worker --gpus`: which GPUs get a worker, and clear errors for bad values."""
from __future__ import annotations

import os

import pytest
from click.testing import CliRunner

from imagegenx import cli, launcher
from imagegenx.launcher import gpu_worker_env, parse_gpus


@pytest.mark.parametrize(
    ("spec", "available", "expected"),
    [
        ("all", 2, [0, 1]),
        ("ALL", 1, [0]),
        ("0", 2, [0]),
        ("1", 2, [1]),
        ("0,1", 2, [0, 1]),
        (" 1 , 0 ", 4, [1, 0]),
        ("3", None, [3]),  # GPU count unknown: indices are taken as given
    ],
)
def test_valid_values(spec: str, available: int | None, expected: list[int]) -> None:
    assert parse_gpus(spec, available) == expected


@pytest.mark.parametrize(
    ("spec", "available", "message"),
    [
        ("2", 2, "GPU 2 does not exist (this machine has GPUs 0 to 1)"),
        ("0", 0, "GPU 0 does not exist (this machine has no GPU)"),
        ("all", 0, "no GPU found"),
        ("all", None, "cannot count the GPUs"),
        ("0,0", 2, "GPU 0 is listed twice"),
        ("-1", 2, "'-1' is not a GPU index"),
        ("a", 2, "'a' is not a GPU index"),
        ("0,", 2, "expected 'all' or comma-separated GPU indices"),
        ("", 2, "expected 'all' or comma-separated GPU indices"),
    ],
)
def test_invalid_values(spec: str, available: int | None, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_gpus(spec, available)


def test_each_worker_sees_only_its_gpu() -> None:
    env = gpu_worker_env({"PATH": "/bin", "CUDA_VISIBLE_DEVICES": "0,1"}, 1)
    assert env == {"PATH": "/bin", "CUDA_VISIBLE_DEVICES": "1"}


def test_cli_names_the_option_in_its_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(launcher, "count_gpus", lambda: 1)
    result = CliRunner().invoke(cli.main, ["worker", "--gpus", "0,1"])
    assert result.exit_code == 2
    assert "--gpus" in result.output
    assert "GPU 1 does not exist (this machine has GPUs 0 to 0)" in result.output


MODELS = '{"base": {"engine": "synthetic"}, "anime": {"engine": "synthetic"}}'


def test_worker_model_must_be_served(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(launcher, "count_gpus", lambda: 1)
    monkeypatch.setenv("IMAGEGENX_MODELS", MODELS)
    result = CliRunner().invoke(cli.main, ["worker", "--gpus", "0", "--model", "photo"])
    assert result.exit_code == 2 and "--model" in result.output
    assert "'photo' is not served; served models: base, anime" in result.output


def test_workers_of_one_model_get_it_in_their_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    spawned: list[tuple[str, dict[str, str]]] = []
    options: dict[str, object] = {}

    class Recorder:
        def __init__(self, **kwargs: object) -> None:
            options.update(kwargs)

        def trap_signals(self) -> None: ...
        def spawn(self, name: str, cmd: list[str], env: dict[str, str]) -> None:
            spawned.append((name, env))
        def wait(self) -> int:
            return 0

    monkeypatch.setattr(launcher, "count_gpus", lambda: 2)
    monkeypatch.setattr(launcher, "Supervisor", Recorder)
    monkeypatch.setenv("IMAGEGENX_MODELS", MODELS)
    result = CliRunner().invoke(cli.main, ["worker", "--gpus", "all", "--model", "anime"])
    assert result.exit_code == 0, result.output
    assert [(n, e["IMAGEGENX_WORKER_MODEL"], e["CUDA_VISIBLE_DEVICES"]) for n, e in spawned] == [
        ("gpu0", "anime", "0"), ("gpu1", "anime", "1")]
    assert "started 2 worker(s) of model anime on GPU(s) 0,1" in result.output
    assert options == {"restart_codes": frozenset({os.EX_SOFTWARE})}  # a lost GPU: that worker again
