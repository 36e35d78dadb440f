"""`imagegenx status`, `cancel`, `download` and generate's post-processing options,
against a real API and worker (synthetic engine)."""
from __future__ import annotations

import io
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from click.testing import CliRunner, Result
from PIL import Image, ImageChops

from imagegenx.cli import main
from tests.integration.stack import API_KEY, Stack, running_stack
from tests.service import wait_task

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def stack(redis_base: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Requests wait 1.5 s in the worker's buffer: long enough to cancel one."""
    with running_stack(redis_base, tmp_path_factory.mktemp("cli-tasks"), None, name="clitasks",
                       IMAGEGENX_ENGINE="synthetic", IMAGEGENX_MAX_WAIT_MS="1500",
                       IMAGEGENX_ADMIT_DELAY_MS="1500") as s:
        yield s


def cli(stack: Stack, *args: str) -> Result:
    """Run the command as a user would, with the key in IMAGEGENX_API_KEY."""
    return CliRunner().invoke(main, [*args], env={"IMAGEGENX_API_KEY": API_KEY,
                                                  "IMAGEGENX_API_URL": stack.base})


def submitted(res: Result) -> str:
    assert res.exit_code == 0, res.output
    return res.stdout.strip().splitlines()[-1]


def test_cancel_revokes_a_waiting_task_and_status_shows_it(stack: Stack) -> None:
    task = submitted(cli(stack, "generate", "a red circle", "--no-wait"))
    res = cli(stack, "cancel", task)
    assert res.exit_code == 0, res.output
    assert res.stdout == f"{task} REVOKED\n"
    assert cli(stack, "status", task).stdout.splitlines()[0] == f"{task} REVOKED"
    none = cli(stack, "download", task)
    assert none.exit_code == 1 and f"task {task} is REVOKED: no images to download" in none.output


def test_post_processing_options_status_and_download(stack: Stack, tmp_path: Path) -> None:
    common = ["--seed", "3", "--width", "64", "--height", "64", "--upscale", "2", "--no-wait"]
    marked = submitted(cli(stack, "generate", "a square", *common, "--thumbnail", "32",
                           "--watermark", "IGX"))
    plain = submitted(cli(stack, "generate", "a square", *common))
    for task in (marked, plain):
        assert wait_task(stack.base, task, API_KEY, 30)["state"] == "SUCCESS"

    lines = cli(stack, "status", marked).stdout.splitlines()
    assert lines[0] == f"{marked} SUCCESS" and lines[1].startswith(f"{stack.base}/api/v1/files/")

    res = cli(stack, "download", marked, "--out", str(tmp_path / "imgs"))
    assert res.exit_code == 0, res.output
    assert res.stdout == f"{tmp_path / 'imgs' / f'{marked}-0.png'}\n"
    assert cli(stack, "download", plain, "--out", str(tmp_path / "imgs")).exit_code == 0
    with_mark, without = (Image.open(tmp_path / "imgs" / f"{t}-0.png").convert("RGB") for t in (marked, plain))
    assert with_mark.size == without.size == (128, 128)  # --upscale 2
    assert ImageChops.difference(with_mark, without).getbbox() is not None  # the watermark
    thumb_url = requests.get(f"{stack.base}/api/v1/tasks/{marked}", headers=stack.headers,
                             timeout=5).json()["result"]["images"][0]["thumbnail_url"]
    assert max(Image.open(io.BytesIO(requests.get(thumb_url, timeout=5).content)).size) == 32

    late = cli(stack, "cancel", marked)
    assert late.exit_code == 1 and "task already finished (SUCCESS)" in late.output


def test_bad_option_unknown_task_and_missing_key_are_one_line_errors(stack: Stack, tmp_path: Path) -> None:
    bad = cli(stack, "generate", "x", "--thumbnail", "4")
    assert bad.exit_code == 2 and "--thumbnail: must be at least 16" in bad.output
    task = str(uuid.uuid4())
    for command in ("status", "cancel", "download"):
        res = cli(stack, command, task)
        assert res.exit_code == 1 and f"Error: no task {task} (for this API key)" in res.output
    keyless = CliRunner().invoke(main, ["status", task], env={
        "IMAGEGENX_API_KEY": None, "IMAGEGENX_DATA_DIR": str(tmp_path), "IMAGEGENX_API_URL": stack.base})
    assert keyless.exit_code == 2 and "set IMAGEGENX_API_KEY" in keyless.output
    assert "Traceback" not in bad.output + res.output + keyless.output
