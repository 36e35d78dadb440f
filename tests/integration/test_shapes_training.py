"""The training script runs end to end (a few steps on the CPU) and writes a
model folder the engine serves."""
from __future__ import annotations

import json
from pathlib import Path

from imagegenx.engine.base import BatchSpec, Sample
from imagegenx.engine.diffusion import DiffusionEngine
from imagegenx.shapes import model_config
from imagegenx.shapes.train import main


def test_training_smoke_run_writes_a_servable_fp16_model(tmp_path: Path) -> None:
    out = tmp_path / "shapes"
    # --snapshot-minutes 0: a snapshot after the first UNet step, then the finished model over it
    main(["--out", str(out), "--device", "cpu", "--batch", "2", "--vae-steps", "1", "--unet-steps", "2",
          "--snapshot-minutes", "0"])
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
