"""ONNX export of the UNet, VAE decoder and text encoder of the tiny model (random
weights) and of the shipped shapes model (trained), run by onnxruntime on the CPU
against PyTorch on the same inputs.

Tolerances are those of ``optimize.onnx_check`` (fp32: max|onnx - torch| <=
1e-4 + 1e-3 x max|torch|). The graphs are exported at batch 2 and checked at
batch 1 and 3, which fails unless the batch axis is really dynamic.
"""
from __future__ import annotations

import os
from pathlib import Path

import onnx
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from imagegenx.engine.diffusion import DiffusionEngine  # noqa: E402
from imagegenx.shapes.model_files import SHAPES_MODEL  # noqa: E402
from optimize.export import COMPONENTS, SPECS, export_components  # noqa: E402
from optimize.onnx_check import compare  # noqa: E402


@pytest.fixture(scope="module", params=["tiny", "shapes"])
def engine(request: pytest.FixtureRequest, tiny_model: Path) -> DiffusionEngine:
    return DiffusionEngine.load(tiny_model if request.param == "tiny" else SHAPES_MODEL, device="cpu", dtype="fp32")


def _batch_dims(path: Path) -> list[str]:
    graph = onnx.load(str(path), load_external_data=False).graph
    return [t.type.tensor_type.shape.dim[0].dim_param for t in [*graph.input, *graph.output]]


def test_all_components_match_pytorch_at_two_batch_sizes(engine: DiffusionEngine, tmp_path: Path) -> None:
    results = export_components(engine, tmp_path, COMPONENTS, exporter="torchscript")
    assert [r.component for r in results] == list(COMPONENTS)
    for r in results:
        assert r.path == tmp_path / f"{r.component}.onnx" and not r.external_data
        names = [i.name for i in onnx.load(str(r.path), load_external_data=False).graph.input]
        assert names == list(SPECS[r.component].inputs)
        assert all(_batch_dims(r.path)), f"{r.component}: batch axis not symbolic"
        checks = compare(r.component, engine, r.path)
        assert [c.batch for c in checks] == [1, 3]
        for c in checks:
            print(f"{c.component} batch {c.batch}: max abs {c.max_abs:.2e}, relative {c.max_rel:.2e}")
            assert c.passed, c


def test_dynamo_exporter_with_external_data(engine: DiffusionEngine, tmp_path: Path) -> None:
    [r] = export_components(engine, tmp_path, ["text_encoder"], exporter="dynamo", external_data=True)
    assert r.exporter == "dynamo" and r.external_data
    data = tmp_path / "text_encoder.onnx.data"
    assert data.stat().st_size > (tmp_path / "text_encoder.onnx").stat().st_size  # weights live outside
    for c in compare("text_encoder", engine, r.path):
        print(f"dynamo text_encoder batch {c.batch}: max abs {c.max_abs:.2e}")
        assert c.passed, c
