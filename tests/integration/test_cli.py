"""The README's run command (`imagegenx up`) and `imagegenx model init`."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import requests
from click.testing import CliRunner

from imagegenx.cli import main
from tests.service import free_port, wait_task

pytestmark = pytest.mark.integration


def test_up_starts_the_whole_service_and_stops_it(redis_base: str, tmp_path: Path) -> None:
    api_port, flower_port = free_port(), free_port()
    env = {**os.environ, "IMAGEGENX_BROKER_URL": f"{redis_base}/3",
           "IMAGEGENX_RESULT_BACKEND": f"{redis_base}/3",
           "IMAGEGENX_QUEUE": f"up-{uuid.uuid4().hex[:6]}", "IMAGEGENX_API_PORT": str(api_port),
           "IMAGEGENX_FLOWER_PORT": str(flower_port), "IMAGEGENX_FLOWER_AUTH": "ops:secret",
           "IMAGEGENX_STORAGE_ROOT": str(tmp_path / "var" / "images"),
           "IMAGEGENX_MODEL": str(tmp_path / "var" / "models" / "tiny")}
    env.pop("IMAGEGENX_API_KEYS", None)
    log = (tmp_path / "up.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "imagegenx.cli", "up"], cwd=tmp_path, env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{api_port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, (tmp_path / "up.log").read_text()
            try:
                if requests.get(f"{base}/healthz", timeout=1).status_code == 200:
                    break
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline, (tmp_path / "up.log").read_text()
            time.sleep(0.3)
        key = (tmp_path / "var" / "api-key").read_text().strip()
        r = requests.post(f"{base}/api/v1/images", json={"prompt": "hello", "seed": 1},
                          headers={"X-API-Key": key}, timeout=5)
        assert r.status_code == 202
        res = wait_task(base, r.json()["task_id"], key, 60)
        assert res["state"] == "SUCCESS"
        url = res["result"]["images"][0]["url"]
        assert url.startswith(base)
        assert requests.get(url, timeout=5).status_code == 200
        assert requests.get(f"http://127.0.0.1:{flower_port}/", timeout=5).status_code == 401
        assert requests.get(f"http://127.0.0.1:{flower_port}/api/workers", auth=("ops", "secret"),
                            timeout=10).status_code == 200
        # gunicorn's processes share their metrics through a directory `up` prepares.
        metrics = requests.get(f"{base}/metrics", timeout=5).text
        assert 'imagegenx_api_requests_total{endpoint="/api/v1/images",method="POST",status="202"} 1.0' in metrics
        assert list((tmp_path / "var" / "prometheus-api").glob("*.db"))
    finally:
        os.killpg(proc.pid, signal.SIGTERM) if proc.poll() is None else None
        proc.wait(60)
    with pytest.raises(requests.RequestException):
        requests.get(f"{base}/healthz", timeout=1)


def test_model_init_writes_a_tiny_model_and_refuses_to_overwrite(tmp_path: Path) -> None:
    runner = CliRunner()
    target = tmp_path / "m"
    result = runner.invoke(main, ["model", "init", "--tiny", str(target)])
    assert result.exit_code == 0, result.output
    assert (target / "model_index.json").exists()
    again = runner.invoke(main, ["model", "init", "--tiny", str(target)])
    assert again.exit_code == 2 and "--force" in again.output


def test_model_init_rejects_an_unknown_architecture(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["model", "init", "--arch", "sdxl", str(tmp_path / "x")])
    assert result.exit_code == 2 and "--arch" in result.output


def test_bench_runs_a_benchmark_and_names_a_bad_choice() -> None:
    runner = CliRunner()
    res = runner.invoke(main, ["bench", "overhead", "--help"])
    assert res.exit_code == 0 and "--duration" in res.output
    bad = runner.invoke(main, ["bench", "nope"])
    assert bad.exit_code == 2 and "NAME" in bad.output and "overhead" in bad.output
