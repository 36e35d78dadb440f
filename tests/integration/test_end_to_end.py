"""End to end through HTTP: API -> Redis -> batching worker (tiny real model) -> result."""
from __future__ import annotations

import io
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
from celery.result import AsyncResult
from PIL import Image

from tests.integration.stack import Stack, running_stack
from tests.service import wait_task

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def stack(redis_base: str, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with running_stack(redis_base, tmp_path_factory.mktemp("e2e"), tiny_model) as s:
        yield s


def submit(stack: Stack, body: dict) -> str:
    r = requests.post(f"{stack.base}/api/v1/images", json=body, headers=stack.headers, timeout=10)
    assert r.status_code == 202, r.text
    payload = r.json()
    assert payload["status_url"].endswith(f"/api/v1/tasks/{payload['task_id']}")
    return payload["task_id"]


def fetch_png(url: str) -> Image.Image:
    r = requests.get(url, timeout=10)
    assert r.status_code == 200
    assert r.headers["Content-Type"] == "image/png"
    assert r.content[:8] == b"\x89PNG\r\n\x1a\n"
    image = Image.open(io.BytesIO(r.content))
    image.load()
    return image


def test_sixteen_concurrent_requests_are_batched(stack: Stack) -> None:
    sizes = [(64, 64)] * 12 + [(96, 64)] * 4
    bodies = [{"prompt": f"a red circle number {i}", "width": w, "height": h, "seed": 1000 + i}
              for i, (w, h) in enumerate(sizes)]
    with ThreadPoolExecutor(16) as pool:
        ids = list(pool.map(lambda b: submit(stack, b), bodies))
        results = list(pool.map(lambda t: wait_task(stack.base, t, "test-key-0123456789", 120), ids))
    assert [r["state"] for r in results] == ["SUCCESS"] * 16
    batch_sizes = {r["result"]["batch"]["id"]: r["result"]["batch"]["size"] for r in results}
    assert max(batch_sizes.values()) >= 4, batch_sizes
    for body, res in zip(bodies, results):
        (image,) = res["result"]["images"]
        assert image["seed"] == body["seed"]
        png = fetch_png(image["url"])
        assert png.size == (body["width"], body["height"]) == (image["width"], image["height"])
        assert png.mode == "RGB"
        thumb = fetch_png(image["thumbnail_url"])
        assert max(thumb.size) <= 128


def pixels(url: str) -> np.ndarray:
    return np.asarray(fetch_png(url), dtype=np.int16)


def test_same_seed_alone_and_in_a_batch_gives_the_same_image(stack: Stack) -> None:
    """Tolerance: at most 2/255 per channel (CPU matmul blocking differs with
    batch size, so float rounding differs slightly; the picture is the same)."""
    target = {"prompt": "a small blue square on a yellow background", "seed": 42,
              "guidance_scale": 6.0}
    alone = wait_task(stack.base, submit(stack, target), "test-key-0123456789", 60)
    assert alone["result"]["batch"]["size"] == 1
    others = [{"prompt": f"other prompt {i}", "seed": i, "guidance_scale": 3.0 + i}
              for i in range(5)]
    with ThreadPoolExecutor(6) as pool:
        ids = list(pool.map(lambda b: submit(stack, b), [*others[:3], target, *others[3:]]))
    batched = wait_task(stack.base, ids[3], "test-key-0123456789", 60)
    assert batched["result"]["batch"]["size"] > 1, "target did not share a batch"
    a = pixels(alone["result"]["images"][0]["url"])
    b = pixels(batched["result"]["images"][0]["url"])
    assert a.shape == b.shape
    assert int(np.abs(a - b).max()) <= 2


def test_num_images_and_watermark(stack: Stack) -> None:
    body = {"prompt": "two pictures", "num_images": 3, "seed": 7,
            "postprocess": {"thumbnail": 32, "watermark": {"text": "IGX", "opacity": 1.0}}}
    res = wait_task(stack.base, submit(stack, body), "test-key-0123456789", 60)
    assert res["state"] == "SUCCESS"
    images = res["result"]["images"]
    assert [im["seed"] for im in images] == [7, 8, 9]
    for im in images:
        assert max(fetch_png(im["thumbnail_url"]).size) == 32


def test_server_picks_and_returns_a_seed(stack: Stack) -> None:
    r = requests.post(f"{stack.base}/api/v1/images", json={"prompt": "no seed"},
                      headers=stack.headers, timeout=10)
    seed = r.json()["seed"]
    res = wait_task(stack.base, r.json()["task_id"], "test-key-0123456789", 60)
    assert res["result"]["images"][0]["seed"] == seed


def test_celery_client_gets_the_result_dict(stack: Stack) -> None:
    task_id = submit(stack, {"prompt": "polled with celery", "seed": 3})
    result = AsyncResult(task_id, app=stack.celery).get(timeout=60)
    assert set(result) >= {"images", "batch", "timings"}
    assert set(result["images"][0]) >= {"url", "thumbnail_url", "seed", "width", "height"}
    assert set(result["batch"]) >= {"id", "size"}


def test_other_keys_cannot_see_a_task(stack: Stack) -> None:
    task_id = submit(stack, {"prompt": "mine", "seed": 1})
    wait_task(stack.base, task_id, "test-key-0123456789", 60)
    r = requests.get(f"{stack.base}/api/v1/tasks/{task_id}", headers={"X-API-Key": "nope"},
                     timeout=5)
    assert r.status_code == 401


def test_healthz_reports_redis_and_worker(stack: Stack) -> None:
    r = requests.get(f"{stack.base}/healthz", timeout=5)
    assert r.status_code == 200
    body = r.json()
    assert body["redis"] is True and stack.worker.hostname in body["workers"]


def test_python_client_submit_progress_wait_download(stack: Stack, tmp_path: Path) -> None:
    from imagegenx.client import ApiError, Client

    client = Client(stack.base, "test-key-0123456789")
    sub = client.submit("client test", seed=11, steps=8)
    states = [s.state for s in client.progress(sub.task_id, poll_s=0.01, timeout=60)]
    assert states[-1] == "SUCCESS"
    result = client.wait(sub.task_id, timeout=5)
    path = client.download(result.images[0].url, tmp_path / "x.png")
    assert Image.open(path).size == (64, 64)
    with pytest.raises(ApiError) as err:
        client.submit("bad", width=7)
    assert err.value.status == 422 and err.value.fields[0]["field"] == "width"


def test_cli_generate_waits_and_writes_the_png(stack: Stack, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from imagegenx.cli import main

    out = tmp_path / "out.png"
    runner = CliRunner()
    res = runner.invoke(main, ["generate", "a cli image", "--api-url", stack.base, "--api-key",
                               "test-key-0123456789", "--seed", "5", "--num-images", "2",
                               "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert Image.open(tmp_path / "out-0.png").size == (64, 64)
    assert Image.open(tmp_path / "out-1.png").size == (64, 64)
    bad = runner.invoke(main, ["generate", "x", "--api-url", stack.base, "--api-key",
                               "test-key-0123456789", "--width", "100"])
    assert bad.exit_code == 2 and "--width: must be a multiple of 8" in bad.output
