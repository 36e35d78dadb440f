"""Train the shapes model: a VAE, then a text-conditioned UNet with its CLIP text encoder.

One command, seeded, reproducible on one GPU:

    python -m imagegenx.shapes.train --out var/models/shapes-new

Pictures are rendered on the training device at every step (never stored), so
the only input is the seed. The result is a diffusers StableDiffusionPipeline
folder in fp16 safetensors that the engine loads like any SD1.5 model.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import logging
import random
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel

from imagegenx.engine.model_init import SD15_SCHEDULER, _model_index, _text_config, _write_json
from imagegenx.engine.tokenizer import MAX_LENGTH, load_clip_tokenizer, write_clip_tokenizer
from imagegenx.shapes import model_config as cfg
from imagegenx.shapes.captions import POSITIONS, SIZES, Scene, all_triplets, caption, held_out_triplets
from imagegenx.shapes.render import (
    COLOUR_INDEX,
    POSITION_JITTER,
    SHAPE_INDEX,
    SIZE_JITTER,
    TRIANGLE_CIRCUMRADIUS,
    render_indices,
)

log = logging.getLogger("imagegenx.shapes.train")
SIZE_NAMES = list(SIZES)
POSITION_NAMES = list(POSITIONS)
UNCOND_P = 0.1  # captions dropped to "" so classifier-free guidance works


@dataclass
class TrainConfig:
    out: Path
    seed: int = 0
    device: str = "cuda"
    batch: int = 128
    vae_steps: int = 3000
    vae_lr: float = 1e-3
    vae_minutes: float | None = None  # instead of vae_steps, as for the UNet
    unet_steps: int = 8000
    # Instead of unet_steps: time the first steps and fit the step count into this budget.
    unet_minutes: float | None = None
    unet_lr: float = 8e-4
    min_snr_gamma: float = 5.0  # Min-SNR loss weighting: faster convergence on easy timesteps
    ema: float = 0.999
    log_every: int = 200
    # Write the EMA model to ``out`` this often during UNet training (None: only at the end),
    # so a long run leaves a usable model behind if it is cut short.
    snapshot_minutes: float | None = None


class CaptionTable:
    """Every training caption, tokenised once, with the attributes it states (-1: open)."""

    def __init__(self, tokenizer, device: torch.device) -> None:
        held = held_out_triplets()
        rows: list[tuple[int, int, int, int, int]] = []
        texts: list[str] = []
        for colour, shape, bg in all_triplets():
            if (colour, shape, bg) in held:
                continue
            for size in [None, *SIZE_NAMES]:
                for pos in [None, *POSITION_NAMES]:
                    texts.append(caption(Scene(colour, shape, bg, size, pos)))
                    rows.append((COLOUR_INDEX[colour], SHAPE_INDEX[shape], COLOUR_INDEX[bg],
                                 -1 if size is None else SIZE_NAMES.index(size),
                                 -1 if pos is None else POSITION_NAMES.index(pos)))
        ids = tokenizer(texts + [""], padding="max_length", max_length=MAX_LENGTH, truncation=True,
                        return_tensors="pt").input_ids
        self.texts = texts
        self.ids = ids[:-1].to(device)
        self.empty = ids[-1].to(device)
        self.attrs = torch.tensor(rows, dtype=torch.long, device=device)
        self.sizes = torch.tensor(list(SIZES.values()), device=device)
        self.positions = torch.tensor(list(POSITIONS.values()), device=device)

    def sample(self, n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(pictures in [-1, 1], token ids) for ``n`` random training captions."""
        dev = self.ids.device
        pick = torch.randint(len(self.texts), (n,), generator=gen, device=dev)
        a = self.attrs[pick]
        size = torch.where(a[:, 3] >= 0, a[:, 3], torch.randint(len(SIZE_NAMES), (n,), generator=gen, device=dev))
        pos = torch.where(a[:, 4] >= 0, a[:, 4], torch.randint(len(POSITION_NAMES), (n,), generator=gen, device=dev))
        u = lambda: torch.rand(n, generator=gen, device=dev) * 2 - 1  # noqa: E731
        r = self.sizes[size] * (1 + SIZE_JITTER * u())
        reach = torch.where(a[:, 1] == SHAPE_INDEX["triangle"], r * TRIANGLE_CIRCUMRADIUS, r)
        lo, hi = reach + 0.02, 1 - reach - 0.02
        cx = torch.minimum(hi, torch.maximum(lo, self.positions[pos, 0] + POSITION_JITTER * u()))
        cy = torch.minimum(hi, torch.maximum(lo, self.positions[pos, 1] + POSITION_JITTER * u()))
        pictures = render_indices(a[:, 0], a[:, 1], a[:, 2], cx, cy, r, cfg.IMAGE_SIZE) * 2 - 1
        ids = self.ids[pick].clone()
        drop = torch.rand(n, generator=gen, device=dev) < UNCOND_P
        ids[drop] = self.empty
        return pictures, ids


def train_vae(table: CaptionTable, c: TrainConfig,
              gen: torch.Generator) -> tuple[AutoencoderKL, float, int]:
    """Reconstruction (L1 + MSE) with a light KL term; returns the VAE, its latent scale and steps run."""
    dev = torch.device(c.device)
    vae = AutoencoderKL(**cfg.VAE).to(dev).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=c.vae_lr, weight_decay=0.0)
    amp = _autocast(dev)
    t0 = time.perf_counter()
    total = c.vae_steps
    step = 0
    while step < total:
        step += 1
        total = _fit_budget(step, total, c.vae_minutes, t0, "vae")
        warm = min(1.0, step / 100)
        for g in opt.param_groups:
            g["lr"] = c.vae_lr * warm * max(0.05, 0.5 * (1 + math.cos(math.pi * min(1.0, step / total))))
        x, _ = table.sample(c.batch, gen)
        with amp:
            post = vae.encode(x).latent_dist
            z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen, device=dev)
            y = vae.decode(z).sample
        y = y.float()
        kl = post.kl().mean() / (cfg.IMAGE_SIZE ** 2)
        loss = F.l1_loss(y, x) + F.mse_loss(y, x) + 1e-4 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        if step % c.log_every == 0 or step == total:
            log.info("vae step %d/%d loss %.4f (kl %.1f) %.0f s", step, total, loss.item(), kl.item(),
                     time.perf_counter() - t0)
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        zs = torch.cat([vae.encode(table.sample(c.batch, gen)[0]).latent_dist.mean for _ in range(8)])
    scale = float(1.0 / zs.float().std())
    vae.register_to_config(scaling_factor=scale)
    return vae, scale, total


def train_unet(table: CaptionTable, vae: AutoencoderKL, c: TrainConfig, gen: torch.Generator,
               snapshot: Callable[[UNet2DConditionModel, CLIPTextModel, int], None] | None = None,
               ) -> tuple[UNet2DConditionModel, CLIPTextModel, int]:
    """Epsilon prediction with SD1.5's noise schedule; UNet and text encoder learn together.

    Runs ``unet_steps`` steps with warm-up and cosine decay of the learning rate
    (with ``unet_minutes``, the step count that fits that budget, measured on the
    first steps); the returned modules are exponential moving averages of the
    weights, as is usual for diffusion. ``snapshot`` is called with them every
    ``snapshot_minutes``.
    """
    dev = torch.device(c.device)
    unet = UNet2DConditionModel(**cfg.UNET).to(dev).train()
    text = CLIPTextModel(_text_config(cfg.TEXT_ENCODER)).to(dev).train()
    ema_unet, ema_text = copy.deepcopy(unet).eval(), copy.deepcopy(text).eval()
    for m in (ema_unet, ema_text):
        m.requires_grad_(False)
    params = list(unet.parameters()) + list(text.parameters())
    opt = torch.optim.AdamW(params, lr=c.unet_lr, weight_decay=0.01, fused=dev.type == "cuda")
    noise_sched = DDPMScheduler(**{k: v for k, v in SD15_SCHEDULER.items()
                                   if k in ("beta_start", "beta_end", "beta_schedule", "num_train_timesteps")})
    alphas = noise_sched.alphas_cumprod.to(dev)
    scale = vae.config.scaling_factor
    amp = _autocast(dev)
    total = c.unet_steps
    t0 = last_snapshot = time.perf_counter()
    step = 0
    while step < total:
        step += 1
        total = _fit_budget(step, total, c.unet_minutes, t0, "unet")
        warm = min(1.0, step / 500)
        decay_lr = 0.5 * (1 + math.cos(math.pi * min(1.0, step / total)))
        for g in opt.param_groups:
            g["lr"] = c.unet_lr * warm * max(0.05, decay_lr)
        x, ids = table.sample(c.batch, gen)
        with torch.no_grad():
            z = vae.encode(x).latent_dist.mean * scale
        noise = torch.randn(z.shape, generator=gen, device=dev)
        t = torch.randint(0, len(alphas), (z.shape[0],), generator=gen, device=dev)
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * z + (1 - a).sqrt() * noise
        with amp:
            context = text(ids)[0]
            pred = unet(noisy, t, context).sample
        snr = a.view(-1) / (1 - a.view(-1))
        weight = torch.clamp(snr, max=c.min_snr_gamma) / snr
        loss = (weight * (pred.float() - noise).pow(2).mean(dim=(1, 2, 3))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(c.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for src, dst in ((unet, ema_unet), (text, ema_text)):
                torch._foreach_lerp_(list(dst.parameters()), list(src.parameters()), 1 - decay)
        if step % c.log_every == 0:
            log.info("unet step %d/%d loss %.4f %.0f s", step, total, loss.item(), time.perf_counter() - t0)
        timing = c.unet_minutes is not None and step <= 100  # _fit_budget times these steps
        if (snapshot is not None and c.snapshot_minutes is not None and step < total and not timing
                and time.perf_counter() - last_snapshot >= 60 * c.snapshot_minutes):
            try:
                snapshot(ema_unet, ema_text, step)
            except OSError as exc:  # e.g. a full disk: the run goes on, the final save may still work
                log.warning("snapshot at unet step %d failed: %s", step, exc)
            last_snapshot = time.perf_counter()
    return ema_unet, ema_text, step


def _fit_budget(step: int, total: int, minutes: float | None, t0: float, phase: str) -> int:
    """With a time budget, the step count that fits it, measured over the first 100 steps."""
    if minutes is None or step != 101:
        return total
    per_step = (time.perf_counter() - t0) / 100
    total = max(200, int(60 * minutes / per_step))
    log.info("%s: %.1f ms per step, %d steps fit in %.1f min", phase, 1000 * per_step, total, minutes)
    return total


def _autocast(dev: torch.device):
    return torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda")


def save(out: Path, unet: UNet2DConditionModel, vae: AutoencoderKL, text: CLIPTextModel,
         meta: dict[str, object]) -> Path:
    """The diffusers SD pipeline layout, fp16 safetensors; the modules are left as they were.

    Written next to ``out`` and then swapped in, so a reader (or a run cut short
    while saving) sees the old model or the new one, never half of one.
    """
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name, module in (("unet", unet), ("vae", vae), ("text_encoder", text)):
        half = torch.nn.Module.to(copy.deepcopy(module), device="cpu", dtype=torch.float16)
        half.save_pretrained(tmp / name, safe_serialization=True)
    write_clip_tokenizer(tmp / "tokenizer")
    _write_json(tmp / "scheduler" / "scheduler_config.json", SD15_SCHEDULER)
    _write_json(tmp / "model_index.json", _model_index())
    (tmp / "training.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    old = out.with_name(out.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)
    return out


def train(c: TrainConfig) -> Path:
    random.seed(c.seed)
    torch.manual_seed(c.seed)
    dev = torch.device(c.device)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    gen = torch.Generator(device=dev).manual_seed(c.seed)
    with tempfile.TemporaryDirectory() as tmp:
        table = CaptionTable(load_clip_tokenizer(write_clip_tokenizer(Path(tmp))), dev)
    t0 = time.perf_counter()
    vae, scale, vae_steps = train_vae(table, c, gen)
    t_vae = time.perf_counter() - t0

    def meta(steps: int, finished: bool) -> dict[str, object]:
        return {"seed": c.seed, "batch": c.batch, "vae_steps": vae_steps, "unet_steps": steps,
                "finished": finished, "vae_s": round(t_vae, 1),
                "unet_s": round(time.perf_counter() - t0 - t_vae, 1),
                "latent_scale": scale, "training_captions": len(table.texts),
                "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
                "held_out_triplets": sorted(held_out_triplets())}

    def snapshot(unet: UNet2DConditionModel, text: CLIPTextModel, step: int) -> None:
        save(c.out, unet, vae, text, meta(step, finished=False))
        log.info("snapshot at unet step %d written to %s", step, c.out)

    unet, text, steps = train_unet(table, vae, c, gen, snapshot)
    done = meta(steps, finished=True)
    log.info("trained: %s", done)
    return save(c.out, unet, vae, text, done)


def _number(kind: type, low: float, strict: bool) -> Callable[[str], float]:
    """An argparse type: a ``kind`` above ``low`` (or at least ``low`` unless ``strict``)."""
    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not (value > low if strict else value >= low):  # also refuses NaN
            raise argparse.ArgumentTypeError(f"must be {'above' if strict else 'at least'} {low}, got {text}")
        return value
    return parse


def check_out(out: Path) -> str | None:
    """Why ``out`` must not be trained into, or None: saving replaces the folder, so it
    must be new, empty, or an earlier model (it has model_index.json)."""
    out = out.resolve()
    if out == out.parent:
        return f"{out} is a file system root"
    if out.exists() and not out.is_dir():
        return f"{out} is a file"
    if out.is_dir() and any(out.iterdir()) and not (out / "model_index.json").is_file():
        return f"{out} holds other files (not a model folder); saving would replace them"
    return None


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True,
                   help="folder to write the model to: new, empty, or an earlier model (it is replaced)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda")
    p.add_argument("--batch", type=_number(int, 1, strict=False), default=TrainConfig.batch)
    p.add_argument("--vae-steps", type=_number(int, 1, strict=False), default=TrainConfig.vae_steps)
    p.add_argument("--vae-minutes", type=_number(float, 0, strict=True), default=None,
                   help="instead of --vae-steps: as many steps as fit in this time (measured)")
    p.add_argument("--unet-steps", type=_number(int, 1, strict=False), default=TrainConfig.unet_steps)
    p.add_argument("--unet-minutes", type=_number(float, 0, strict=True), default=None,
                   help="instead of --unet-steps: as many steps as fit in this time (measured)")
    p.add_argument("--snapshot-minutes", type=_number(float, 0, strict=False), default=None,
                   help="also write the model (marked unfinished) this often during UNet training "
                        "(0: after every step)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA GPU is available (use --device cpu for a smoke run)")
    problem = check_out(args.out)
    if problem:
        p.error(f"--out: {problem}")
    out = train(TrainConfig(out=args.out.resolve(), seed=args.seed, device=args.device, batch=args.batch,
                            vae_steps=args.vae_steps, vae_minutes=args.vae_minutes, unet_steps=args.unet_steps,
                            unet_minutes=args.unet_minutes, snapshot_minutes=args.snapshot_minutes))
    print(out)


if __name__ == "__main__":
    main()
