"""The training script runs end to end (a few steps on the CPU) and writes a
model folder the engine serves."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from imagegenx.engine.base import BatchSpec, Sample
from imagegenx.engine.diffusion import DiffusionEngine
from imagegenx.shapes import model_config
from imagegenx.shapes.train import main


def test_training_smoke_run_writes_a_servable_fp16_model(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "shapes"
    # --snapshot-minutes 0: a snapshot after the first UNet step, then the finished model over it
    with caplog.at_level(logging.INFO, logger="imagegenx.shapes.train"):
        main(["--out", str(out), "--device", "cpu", "--batch", "2", "--vae-steps", "1", "--unet-steps", "2",
              "--snapshot-minutes", "0"])
    assert [r.getMessage() for r in caplog.records if "snapshot" in r.getMessage()] == [
        f"snapshot at unet step 1 written to {out}"]
    meta = json.loads((out / "training.json").read_text())
    assert meta["unet_steps"] == 2 and meta["vae_steps"] == 1 and len(meta["held_out_triplets"]) == 16
    assert meta["finished"] is True
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shapes"]  # no half-written copies left
    weights = sum(f.stat().st_size for f in out.rglob("*.safetensors"))
    assert weights <= 25 * 2**20  # fits the repository budget in fp16
    engine = DiffusionEngine.load(out, device="cpu", dtype="fp32")
    assert engine.native_size == (model_config.IMAGE_SIZE, model_config.IMAGE_SIZE)
    (image,) = engine.generate(BatchSpec(64, 64, 2, "euler", (Sample("a red circle on a blue background", 1),)))
    assert image is not None and image.size == (64, 64)


@pytest.mark.parametrize("args, message", [
    (["--snapshot-minutes", "-1"], "--snapshot-minutes: must be at least 0"),
    (["--unet-minutes", "0"], "--unet-minutes: must be above 0"),
    (["--batch", "two"], "--batch: 'two' is not a number"),
])
def test_bad_options_are_named(tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str],
                               message: str) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--out", str(tmp_path / "m"), "--device", "cpu", *args])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_an_out_folder_holding_other_files_is_refused_before_training(tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(SystemExit) as exit_:
        main(["--out", str(tmp_path), "--device", "cpu", "--vae-steps", "1", "--unet-steps", "1"])
    assert exit_.value.code == 2 and "--out:" in capsys.readouterr().err
    assert (tmp_path / "notes.txt").read_text() == "keep me"
