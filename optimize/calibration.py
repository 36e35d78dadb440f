"""Calibration data: the UNet's real inputs along real denoising trajectories.

Quantization scales are fitted to activations, and a UNet's activations depend
strongly on the timestep and on how far the latents are from pure noise. So
the inputs are not drawn at random: the engine's own denoise loop
(``DiffusionEngine.generate``) draws images for the shipped prompts, and a
forward pre-hook on the UNet records (sample, timestep, encoder_hidden_states)
of every call, keeping every ``every``-th step of each trajectory. Rows come in
classifier-free-guidance pairs (unconditional and conditional), as the engine
runs them.

Text embeddings are stored once per batch, not once per step.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from optimize.choices import PROMPT_FILES

if TYPE_CHECKING:
    from imagegenx.engine.diffusion import DiffusionEngine

PROMPTS_PATH = PROMPT_FILES["general"]
FORMAT_VERSION = 1


def load_prompts(path: Path | None = None) -> list[str]:
    """Prompts of ``path`` (default: the shipped file), one a line; # comments skipped."""
    text = Path(path or PROMPTS_PATH).read_text(encoding="utf-8")
    prompts = [line.strip() for line in text.splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise ValueError(f"{path or PROMPTS_PATH} holds no prompts")
    return prompts


@dataclass
class Record:
    """One recorded UNet call."""

    step: int  # index into the scheduler's timesteps
    batch: int  # which generate call (and thus which stored context)
    sample: torch.Tensor  # (rows, C, h, w), as the UNet received it
    timestep: torch.Tensor  # (rows,)


@dataclass
class CalibrationSet:
    """Recorded UNet inputs plus how they were produced."""

    records: list[Record]
    contexts: list[torch.Tensor]  # per batch: (rows, 77, D) encoder_hidden_states
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.records)

    def inputs(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(sample, timestep, encoder_hidden_states) of every record, on the CPU in fp32."""
        for r in self.records:
            yield r.sample, r.timestep, self.contexts[r.batch]

    def replay(self, unet: Callable[..., Any], device: torch.device | str, dtype: torch.dtype,
               limit: int | None = None) -> None:
        """Feed the recorded inputs to ``unet`` (a ModelOpt ``forward_loop``)."""
        with torch.no_grad():
            for i, (sample, t, context) in enumerate(self.inputs()):
                if limit is not None and i >= limit:
                    break
                unet(sample.to(device, dtype), t.to(device),
                     encoder_hidden_states=context.to(device, dtype))

    def save(self, path: Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        torch.save({
            "version": FORMAT_VERSION,
            "meta": self.meta,
            "contexts": self.contexts,
            "records": [{"step": r.step, "batch": r.batch, "sample": r.sample, "timestep": r.timestep}
                        for r in self.records],
        }, path)

    @classmethod
    def load(cls, path: Path) -> CalibrationSet:
        data = torch.load(path, map_location="cpu", weights_only=True)
        if data.get("version") != FORMAT_VERSION:
            raise ValueError(f"{path}: calibration format {data.get('version')!r}, expected {FORMAT_VERSION}")
        records = [Record(**r) for r in data["records"]]
        return cls(records=records, contexts=list(data["contexts"]), meta=dict(data["meta"]))


class UNetRecorder:
    """Forward pre-hook recording the UNet's inputs, step by step.

    ``start_batch`` must be called before each ``generate``: steps are counted
    from there, so the step index is the position in the scheduler's timesteps.
    """

    def __init__(self, unet: torch.nn.Module, every: int) -> None:
        if every < 1:
            raise ValueError("every must be >= 1")
        self.every = every
        self.records: list[Record] = []
        self.contexts: list[torch.Tensor] = []
        self._step = 0
        self._batch = -1
        self._handle = unet.register_forward_pre_hook(self._hook, with_kwargs=True)

    def start_batch(self) -> None:
        self._batch += 1
        self._step = 0

    def close(self) -> None:
        self._handle.remove()

    def _hook(self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        sample = args[0] if args else kwargs["sample"]
        t = args[1] if len(args) > 1 else kwargs["timestep"]
        context = kwargs.get("encoder_hidden_states")
        if context is None:
            context = args[2]
        step = self._step
        self._step += 1
        if len(self.contexts) <= self._batch:
            self.contexts.append(context.detach().float().cpu().clone())
        if step % self.every:
            return
        rows = sample.shape[0]
        t = torch.as_tensor(t).detach().float().cpu().reshape(-1).expand(rows).clone()
        self.records.append(Record(step=step, batch=self._batch,
                                   sample=sample.detach().float().cpu().clone(), timestep=t))


def capture(engine: DiffusionEngine, prompts: Sequence[str], *, steps: int = 20, sampler: str = "euler",
            every: int = 2, batch_size: int = 4, guidance: float = 7.5, seed: int = 0,
            size: tuple[int, int] | None = None,
            on_batch: Callable[[int, int], None] | None = None) -> CalibrationSet:
    """Draw ``prompts`` with the engine and record the UNet's inputs.

    Sample ``i`` uses seed ``seed + i``. The GPU fast path is switched off for
    the capture (graph replays bypass Python hooks) and restored afterwards.
    """
    from imagegenx.engine.base import BatchSpec, Sample

    if not prompts:
        raise ValueError("no prompts to calibrate with")
    width, height = size or engine.native_size
    recorder = UNetRecorder(engine.unet, every)
    fast_before = engine.fast_path_enabled
    engine.fast_path_enabled = False
    n_batches = (len(prompts) + batch_size - 1) // batch_size
    try:
        for b in range(n_batches):
            chunk = prompts[b * batch_size:(b + 1) * batch_size]
            samples = tuple(Sample(prompt=p, seed=seed + b * batch_size + i, guidance_scale=guidance)
                            for i, p in enumerate(chunk))
            recorder.start_batch()
            engine.generate(BatchSpec(width=width, height=height, steps=steps, sampler=sampler, samples=samples))
            if on_batch is not None:
                on_batch(b + 1, n_batches)
    finally:
        engine.fast_path_enabled = fast_before
        recorder.close()
    meta = {"model": engine.name, "prompts": list(prompts), "steps": steps, "sampler": sampler,
            "every": every, "batch_size": batch_size, "guidance": guidance, "seed": seed,
            "width": width, "height": height}
    return CalibrationSet(records=recorder.records, contexts=recorder.contexts, meta=meta)
