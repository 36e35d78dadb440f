"""Manifest comparison of compiled artifacts (imagegenx/compile_manifest.py): every refusal reason."""
from __future__ import annotations

import pytest

from imagegenx.compile_manifest import CHECKS, CompileManifest, mismatch

BASE = CompileManifest(gpu_arch="sm_90", device_name="NVIDIA H200", torch_version="2.9.1+cu128",
                       triton_version="3.5.1", model_id="abc123", buckets=(1, 2, 4, 8, 16, 32), dtype="fp16",
                       compile_options={"compile": True, "fuse_qkv": True, "channels_last": True,
                                        "conv_1x1_as_mm": True})


def test_a_matching_manifest_is_accepted() -> None:
    assert mismatch(BASE, BASE.model_copy()) is None


def test_another_card_of_the_same_architecture_fits() -> None:
    assert mismatch(BASE, BASE.model_copy(update={"device_name": "NVIDIA H100 80GB HBM3", "created": "x",
                                                   "build_s": 12.0, "artifact_bytes": 5})) is None


@pytest.mark.parametrize(("field", "value", "words", "shown"), [
    ("format", 2, "manifest format", "artifact 2, this worker 1"),
    ("gpu_arch", "sm_80", "GPU architecture", "artifact sm_80, this worker sm_90"),
    ("torch_version", "2.8.0+cu126", "torch version", "artifact 2.8.0+cu126, this worker 2.9.1+cu128"),
    ("triton_version", "", "Triton version", "artifact (none), this worker 3.5.1"),
    ("model_id", "def456", "model", "artifact def456, this worker abc123"),
    ("buckets", (1, 2, 4, 8, 16), "batch buckets", "artifact 1,2,4,8,16, this worker 1,2,4,8,16,32"),
    ("dtype", "bf16", "dtype", "artifact bf16, this worker fp16"),
    ("compile_options", {"compile": True, "fuse_qkv": False, "channels_last": True, "conv_1x1_as_mm": True},
     "compile options", "fuse_qkv=False"),
])
def test_each_mismatch_is_named_on_one_line(field: str, value: object, words: str, shown: str) -> None:
    reason = mismatch(BASE, BASE.model_copy(update={field: value}))
    assert reason is not None
    assert reason.startswith(f"{words} differs: ")
    assert shown in reason
    assert "\n" not in reason


def test_every_checked_field_has_a_case() -> None:
    assert [f for f, _ in CHECKS] == ["format", "gpu_arch", "torch_version", "triton_version", "model_id",
                                      "buckets", "dtype", "compile_options"]


def test_the_first_difference_is_reported() -> None:
    reason = mismatch(BASE, BASE.model_copy(update={"gpu_arch": "sm_89", "dtype": "bf16"}))
    assert reason is not None and reason.startswith("GPU architecture differs")


def test_an_artifact_without_compiled_code_is_refused() -> None:
    reason = mismatch(BASE, BASE.model_copy(update={"artifact": None}))
    assert reason is not None and "no compiled code" in reason


def test_the_manifest_round_trips_through_json() -> None:
    again = CompileManifest.model_validate_json(BASE.model_dump_json())
    assert again == BASE and again.buckets == (1, 2, 4, 8, 16, 32)
