"""bench.cold_start's cache-only copy of an artifact: the peer the precompiled UNet is measured against."""
from __future__ import annotations

import json
from pathlib import Path

from bench.cold_start import table, without_precompiled_unet
from imagegenx.compile_manifest import ARTIFACT_FILE, MANIFEST_FILE, PRECOMPILED_UNET_FILE


def test_cache_only_copy_drops_the_precompiled_unet_and_its_manifest_entry(tmp_path: Path) -> None:
    artifact = tmp_path / "artifact"
    artifact.mkdir()
    (artifact / ARTIFACT_FILE).write_bytes(b"cache")
    (artifact / PRECOMPILED_UNET_FILE).write_bytes(b"unet")
    (artifact / MANIFEST_FILE).write_text(json.dumps(
        {"artifact": ARTIFACT_FILE, "precompiled_unet": PRECOMPILED_UNET_FILE, "precompiled_unet_bytes": 4}))

    copy = without_precompiled_unet(artifact, tmp_path / "copy")

    assert sorted(p.name for p in copy.iterdir()) == sorted([ARTIFACT_FILE, MANIFEST_FILE])
    assert (copy / ARTIFACT_FILE).read_bytes() == b"cache"
    manifest = json.loads((copy / MANIFEST_FILE).read_text())
    assert manifest["precompiled_unet"] is None and manifest["precompiled_unet_bytes"] == 0
    assert manifest["artifact"] == ARTIFACT_FILE
    assert (artifact / PRECOMPILED_UNET_FILE).exists()  # the original is untouched


def test_table_gives_the_precompiled_start_against_the_cache_alone() -> None:
    report = {
        "build": {"seconds": 200.0, "artifact_mb": 90.0, "compiled_graphs": 2,
                  "manifest": {"precompiled_unet_bytes": 30_000_000}},
        "cold_with_artifact": {"ready_s": 30.0, "compile_cache": "loaded", "unet_precompiled": True},
        "cold_cache_only": {"ready_s": 40.0, "compile_cache": "loaded", "unet_precompiled": False},
    }
    text = table(report)
    assert "| build (optimize warmup) | 200.0 |" in text and "30.0 MB" in text
    assert "| cold_cache_only | 40.0 |" in text
    assert "target: ready in at most 20 s with the artifact: missed (30.0 s)" in text
    assert "ready in 30.0 s against 40.0 s with the compile cache alone (0.75x)" in text
