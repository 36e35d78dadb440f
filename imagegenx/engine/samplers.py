"""Sampler names accepted by the API, mapped onto diffusers schedulers.

Every scheduler is built from the served model's own scheduler config, so the
noise schedule (betas, offsets, training steps) is the one the model was
trained with; the sampler name only chooses the integration method.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin

SchedulerConfig = dict[str, Any]

_FACTORIES: dict[str, Callable[[SchedulerConfig], SchedulerMixin]] = {
    "euler": lambda cfg: EulerDiscreteScheduler.from_config(cfg),
    "euler_a": lambda cfg: EulerAncestralDiscreteScheduler.from_config(cfg),
    "ddim": lambda cfg: DDIMScheduler.from_config(cfg),
    "dpmpp_2m": lambda cfg: DPMSolverMultistepScheduler.from_config(
        cfg, algorithm_type="dpmsolver++", solver_order=2, use_karras_sigmas=True
    ),
}

SAMPLERS: tuple[str, ...] = ("euler", "euler_a", "ddim", "dpmpp_2m")

# Scheduler attributes holding one row per sample of the batch (multistep
# solvers remember earlier model outputs). They must shrink with the batch.
_PER_SAMPLE_STATE = ("model_outputs",)


def load_scheduler_config(model_dir: Path) -> SchedulerConfig:
    """Read ``scheduler/scheduler_config.json`` of a diffusers model folder."""
    config = EulerDiscreteScheduler.load_config(str(model_dir), subfolder="scheduler", local_files_only=True)
    return dict(config)


def make_scheduler(name: str, config: SchedulerConfig) -> SchedulerMixin:
    """A fresh scheduler for ``name``; one per batch since schedulers are stateful."""
    try:
        factory = _FACTORIES[name]
    except KeyError:
        raise ValueError(f"unknown sampler {name!r}; expected one of {SAMPLERS}") from None
    return factory(config)


def keep_scheduler_rows(scheduler: SchedulerMixin, keep: Sequence[int]) -> None:
    """Shrink the scheduler's per-sample memory to the batch rows in ``keep``.

    Without this a multistep solver would combine a sample's new model output
    with another sample's previous one once rows leave the batch.
    """
    index: torch.Tensor | None = None
    for attr in _PER_SAMPLE_STATE:
        state = getattr(scheduler, attr, None)
        if not isinstance(state, list):
            continue
        for i, value in enumerate(state):
            if isinstance(value, torch.Tensor):
                if index is None or index.device != value.device:
                    index = torch.as_tensor(list(keep), dtype=torch.long, device=value.device)
                state[i] = value.index_select(0, index)
