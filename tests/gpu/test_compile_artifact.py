"""The compiled artifact on a GPU: `imagegenx optimize warmup` in one process, a
fresh process with empty local caches that loads it compiles from cache hits only,
and runs the UNet precompiled (traced in neither).

Each step is its own process (PyTorch keeps compiled code in memory too). Runs
the tiny model unless IMAGEGENX_GPU_TEST_MODEL names another.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

REPO = Path(__file__).resolve().parents[2]

# A worker's start, in process: build the pipeline (loads the artifact), warm up, report.
WORKER = """
import json
import logging
logging.basicConfig(level=logging.INFO)
from torch._dynamo.utils import counters
from imagegenx.pipeline_factory import build_pipeline
from imagegenx.settings import Settings
engine = build_pipeline(Settings()).engine
report = engine.warmup()
print("REPORT " + json.dumps({"compiled_graphs": report.get("compiled_graphs"),
                              "unet_precompiled": report.get("unet_precompiled"),
                              "inductor": {k: v for k, v in counters["inductor"].items() if "fxgraph" in k}}))
"""


def _env(model: Path, tmp: Path, name: str, **extra: str) -> dict[str, str]:
    caches = tmp / f"inductor-{name}"
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1", "IMAGEGENX_ENGINE": "diffusion",
            "IMAGEGENX_MODEL": str(model), "IMAGEGENX_DEVICE": "cuda",
            "IMAGEGENX_DTYPE": os.environ.get("IMAGEGENX_GPU_TEST_DTYPE", "fp16"),
            "IMAGEGENX_COMPILE": "true", "IMAGEGENX_CUDA_GRAPHS": "true", "IMAGEGENX_COMPILE_CACHE": "",
            "TORCHINDUCTOR_CACHE_DIR": str(caches), "TRITON_CACHE_DIR": str(caches / "triton"), **extra}


def _worker(env: dict[str, str]) -> tuple[dict[str, object], str]:
    done = subprocess.run([sys.executable, "-c", WORKER], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    line = next(ln for ln in done.stdout.splitlines() if ln.startswith("REPORT "))
    return json.loads(line.removeprefix("REPORT ")), done.stderr


def test_a_fresh_process_with_the_artifact_compiles_from_cache_hits(tiny_model: Path, tmp_path: Path) -> None:
    model = Path(os.environ.get("IMAGEGENX_GPU_TEST_MODEL") or tiny_model)
    artifact = tmp_path / "artifact"
    built = subprocess.run([sys.executable, "-m", "imagegenx.cli", "optimize", "warmup", "--out", str(artifact)],
                           env=_env(model, tmp_path, "build"), cwd=REPO, capture_output=True, text=True,
                           timeout=900)
    assert built.returncode == 0, built.stderr[-4000:]
    manifest = json.loads((artifact / "manifest.json").read_text())
    assert manifest["gpu_arch"].startswith("sm_") and manifest["artifact_bytes"] > 0

    assert manifest["precompiled_unet"] == "unet.precompiled", built.stderr[-4000:]

    loaded, log = _worker(_env(model, tmp_path, "load", IMAGEGENX_COMPILE_CACHE=str(artifact)))
    assert "compile cache" in log and "loaded in" in log
    assert "precompiled UNet loaded in" in log
    assert loaded["inductor"].get("fxgraph_cache_hit", 0) >= 1
    assert loaded["inductor"].get("fxgraph_cache_miss", 0) == 0
    # The UNet ran precompiled (nothing traced for it): Dynamo traced the VAE decode alone.
    assert loaded["unet_precompiled"] is True
    assert loaded["compiled_graphs"] == 1

    refused, log = _worker(_env(model, tmp_path, "refused", IMAGEGENX_COMPILE_CACHE=str(artifact),
                                IMAGEGENX_BATCH_BUCKETS="1,2,4"))
    assert "refused (batch buckets differs" in log
    assert refused["inductor"].get("fxgraph_cache_miss", 0) >= 1
    # The UNet once and the VAE decode once, whatever the buckets: no call runs a batch
    # of 1, which would be specialised and compiled again (one row runs padded to two).
    assert refused["unet_precompiled"] is False
    assert refused["compiled_graphs"] == 2
