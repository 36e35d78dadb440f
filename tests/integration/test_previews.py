"""Previews: the shapes model's fitted map against its VAE decode, the engine's
projection, and previews in a running task's progress through HTTP (real worker)."""
from __future__ import annotations

import base64
import io
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
import torch
from PIL import Image

from imagegenx.preview import PreviewMap, map_file
from imagegenx.shapes.model_files import SHAPES_MODEL
from tests.integration.stack import Stack, running_stack
from tests.service import wait_task

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def shapes_engine():  # type: ignore[no-untyped-def]
    from imagegenx.engine.diffusion import DiffusionEngine

    return DiffusionEngine.load(SHAPES_MODEL, device="cpu", dtype="fp32")


def test_the_shipped_map_of_the_shapes_model_follows_its_vae_decode(shapes_engine) -> None:  # type: ignore[no-untyped-def]
    """On pictures the fit never saw (another seed): measured correlation 0.80,
    RMSE 0.22 on a 0..1 scale (a 4x3 linear map of a small nonlinear VAE's latents:
    colours and layout right, edges soft)."""
    from imagegenx.engine.preview_fit import fitting_images, latents_and_decodes, measure

    shipped = PreviewMap.load(map_file(SHAPES_MODEL))
    assert shipped.channels == 4 and shipped.info and shipped.info["correlation"] > 0.75
    assert shapes_engine.preview_map == shipped
    images = fitting_images(96, 64, seed=5, smooth=0.0)
    latents, decoded = latents_and_decodes(shapes_engine.vae, images)
    err = measure(shipped, latents, decoded)
    assert err["correlation"] > 0.75, err
    assert err["rmse"] < 0.26, err
    # Far better than a map fitted to nothing: the mean colour everywhere.
    flat = float(np.sqrt(((decoded - decoded.mean((0, 2, 3), keepdim=True)) ** 2).mean()))
    assert err["rmse"] < 0.8 * flat


def test_the_engine_projects_only_the_rows_asked_for(shapes_engine) -> None:  # type: ignore[no-untyped-def]
    from imagegenx.engine.base import BatchSpec, Sample

    specs = [BatchSpec(64, 64, 10, "euler", tuple(Sample(f"a red circle on a blue background", seed)
                                                     for seed in seeds)) for seeds in ([1, 2], [3])]
    states = [shapes_engine.begin(s) for s in specs]
    for _ in range(4):
        shapes_engine.step(states)
    frames = shapes_engine.preview(states[1:]).arrays()
    assert len(frames) == 1 and frames[0].shape == (1, 16, 16, 3) and frames[0].dtype == np.uint8
    expected = shapes_engine.preview_map.project(states[1].latents.numpy())
    assert np.abs(frames[0].astype(int) - expected.astype(int)).max() <= 1
    both = shapes_engine.preview(states).arrays()
    assert [f.shape[0] for f in both] == [2, 1]


@pytest.fixture(scope="module")
def stack(redis_base: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with running_stack(redis_base, tmp_path_factory.mktemp("previews"), None) as s:  # the shapes model
        yield s


def test_previews_arrive_in_the_progress_of_a_running_task(stack: Stack) -> None:
    r = requests.post(f"{stack.base}/api/v1/images", headers=stack.headers, timeout=10, json={
        "prompt": "a large red circle on a blue background", "seed": 3, "steps": 12,
        "preview": {"every": 4}})
    assert r.status_code == 202, r.text
    task_id = r.json()["task_id"]
    seen: dict[int, dict[str, Any]] = {}
    backend_previews = 0
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        body = requests.get(f"{stack.base}/api/v1/tasks/{task_id}", headers=stack.headers, timeout=5).json()
        if body["state"] == "SUCCESS":
            break
        progress = body.get("progress") or {}
        if progress.get("preview"):
            seen[progress["preview"]["step"]] = progress["preview"]
            meta = stack.celery.backend.get_task_meta(task_id)  # what the event stream reads
            if meta["status"] == "PROGRESS" and "preview" in (meta.get("result") or {}):
                backend_previews += 1
        time.sleep(0.01)
    assert seen, "no preview seen while the task ran"
    assert backend_previews > 0
    assert all(step % 4 == 0 and 0 < step < 12 for step in seen)  # progress interval 0: exact steps
    p = next(iter(seen.values()))
    png = Image.open(io.BytesIO(base64.b64decode(p["png_base64"])))
    assert png.size == (p["width"], p["height"]) == (64, 64) and png.mode == "RGB"
    final = wait_task(stack.base, task_id, "test-key-0123456789", 300)
    assert final["state"] == "SUCCESS"
    # A late preview looks like the picture: its mean colour is near the result's.
    last = seen[max(seen)]
    late = np.asarray(Image.open(io.BytesIO(base64.b64decode(last["png_base64"]))), np.float32)
    result = np.asarray(Image.open(io.BytesIO(requests.get(final["result"]["images"][0]["url"],
                                                           timeout=10).content)).convert("RGB"), np.float32)
    assert np.abs(late.mean((0, 1)) - result.mean((0, 1))).max() < 60


def test_a_request_without_preview_has_none(stack: Stack) -> None:
    r = requests.post(f"{stack.base}/api/v1/images", headers=stack.headers, timeout=10,
                      json={"prompt": "a green square on a white background", "seed": 4, "steps": 6})
    task_id = r.json()["task_id"]
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        body = requests.get(f"{stack.base}/api/v1/tasks/{task_id}", headers=stack.headers, timeout=5).json()
        assert "preview" not in (body.get("progress") or {}) or body["progress"]["preview"] is None
        if body["state"] == "SUCCESS":
            return
        time.sleep(0.01)
    raise AssertionError("task did not finish")


def test_a_model_without_a_map_gets_one_fitted_from_its_vae_at_the_first_preview(tiny_model: Path) -> None:
    from imagegenx.engine.base import BatchSpec, Sample
    from imagegenx.engine.diffusion import DiffusionEngine

    assert not map_file(tiny_model).exists()
    engine = DiffusionEngine.load(tiny_model, device="cpu", dtype="fp32")
    assert engine.preview_map is None
    w, h = engine.native_size
    state = engine.begin(BatchSpec(w, h, 4, "euler", (Sample("a red circle", 1),)))
    engine.step([state])
    (frames,) = engine.preview([state]).arrays()
    assert frames.shape == (1, h // engine.vae_scale_factor, w // engine.vae_scale_factor, 3)
    assert engine.preview_map is not None and engine.preview_map.channels == state.latents.shape[1]
    assert "first preview" in engine.preview_map.info["source"]
