"""Per-row samplers for step-level continuous batching.

A continuously batched UNet call holds rows of many requests, each at its own
step of its own schedule with its own sampler. diffusers' schedulers keep one
step index for the whole batch, so they only build each row's schedule here;
the per-step math is ours and vectorised over rows.

Every supported sampler step is an affine combination, written per row ``r``
at its step ``i`` as::

    x0   = p * x + q * eps                            # predicted clean latents
    next = a * x + b * x0 + c * noise + d * prev      # prev: the row's last x0

with scalar coefficients computed once per (sampler, steps, config) on the
CPU. A batch step gathers each row's six coefficients into one small tensor
(one host-to-device copy) and applies them as whole-batch tensor ops. Rows
never mix, and a term a row does not use is exactly zero, so a row's numbers
are the same alone, batched, or admitted into a running batch at any step.

Latents and this math are fp32 whatever the model dtype, like the engine.
"""
from __future__ import annotations

import functools
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
import torch
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from imagegenx import guidance
from imagegenx.engine.samplers import SchedulerConfig, make_scheduler
from imagegenx.engine.transfer import index_on, to_device_async

Coeffs = tuple[float, float, float, float, float, float]  # p, q, a, b, c, d


@dataclass(frozen=True)
class RowSchedule:
    """One sampler's whole trajectory for a step count, as per-step scalars.

    ``timesteps[i]`` is what the UNet gets at step ``i``, ``c_in[i]`` scales the
    latents into the model input, ``coeffs[i]`` is (p, q, a, b, c, d) above.
    ``ancestral`` rows draw fresh noise at every step; ``keeps_x0`` rows carry
    their predicted x0 to the next step (DPM++ 2M).
    """

    sampler: str
    steps: int
    init_sigma: float
    timesteps: tuple[float, ...]
    c_in: tuple[float, ...]
    coeffs: tuple[Coeffs, ...]
    ancestral: bool = False
    keeps_x0: bool = False


@dataclass(eq=False)
class RowState:
    """The running state of one image row: where it is and what it carries.

    ``generator`` is the row's own CPU generator (the one its initial noise came
    from); ancestral samplers keep drawing from it, so a row's noise never
    depends on its neighbours. ``prev`` is the previous step's x0 on the
    latents' device (DPM++ 2M), None before the first step.
    """

    schedule: RowSchedule
    generator: torch.Generator
    guidance_scale: float
    index: int = 0
    prev: torch.Tensor | None = None
    guidance_interval: guidance.Interval = guidance.FULL

    @property
    def steps(self) -> int:
        return self.schedule.steps

    @property
    def guided(self) -> bool:
        """Whether its current step runs the unconditional row too."""
        return guidance.guided(self.guidance_scale, self.guidance_interval, self.index, self.steps)

    @property
    def reserved_rows(self) -> int:
        return guidance.reserved_rows(self.guidance_scale, self.guidance_interval, self.index, self.steps)

    @property
    def done(self) -> bool:
        return self.index >= self.schedule.steps


def row_schedule(sampler: str, steps: int, config: SchedulerConfig) -> RowSchedule:
    """The cached schedule of ``sampler`` over ``steps`` for a model's scheduler config."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return _cached_schedule(sampler, steps, json.dumps(dict(config), sort_keys=True, default=str))


def start_row(sampler: str, steps: int, config: SchedulerConfig, generator: torch.Generator,
              guidance_scale: float, guidance_interval: guidance.Interval = guidance.FULL) -> RowState:
    """A row at step 0; ``generator`` must already have drawn the row's initial noise."""
    return RowState(row_schedule(sampler, steps, config), generator, guidance_scale,
                    guidance_interval=guidance_interval)


@functools.lru_cache(maxsize=256)
def _cached_schedule(sampler: str, steps: int, config_key: str) -> RowSchedule:
    scheduler = make_scheduler(sampler, json.loads(config_key))
    scheduler.set_timesteps(steps)
    _require(scheduler.config.prediction_type == "epsilon",
             f"prediction_type {scheduler.config.prediction_type!r} (only 'epsilon' is supported)")
    return replace(_BUILDERS[sampler](scheduler, steps), sampler=sampler)


def _require(ok: bool, what: str) -> None:
    if not ok:
        raise ValueError(f"unsupported scheduler setting for per-row sampling: {what}")


def _schedule(scheduler: SchedulerMixin, steps: int, c_in: Sequence[float], coeffs: Sequence[Coeffs],
              **flags: bool) -> RowSchedule:
    timesteps = tuple(float(t) for t in scheduler.timesteps)
    if len(timesteps) != steps or len(coeffs) != steps:
        raise ValueError(f"{scheduler.__class__.__name__} made {len(timesteps)} steps, expected {steps}")
    return RowSchedule(sampler="", steps=steps, init_sigma=float(scheduler.init_noise_sigma),
                       timesteps=timesteps, c_in=tuple(c_in), coeffs=tuple(coeffs), **flags)


def _sigmas(scheduler: SchedulerMixin) -> list[float]:
    return [float(s) for s in scheduler.sigmas]


def _sigma_space_input_scale(sigmas: Sequence[float]) -> list[float]:
    """Euler-family (sigma-space latents) model input scaling 1 / sqrt(sigma^2 + 1) per step."""
    return [1.0 / math.sqrt(s * s + 1.0) for s in sigmas[:-1]]


def _toward_x0(sigma: float, sigma_to: float, noise: float = 0.0) -> Coeffs:
    """Sigma-space Euler step from ``sigma`` to ``sigma_to`` along x - x0, plus ``noise`` * N(0, 1)."""
    ratio = sigma_to / sigma
    return (1.0, -sigma, ratio, 1.0 - ratio, noise, 0.0)


def _euler(scheduler: SchedulerMixin, steps: int) -> RowSchedule:
    """EulerDiscreteScheduler.step without churn (s_churn = 0, the engine's call)."""
    sigmas = _sigmas(scheduler)
    coeffs = [_toward_x0(sigmas[i], sigmas[i + 1]) for i in range(steps)]
    return _schedule(scheduler, steps, _sigma_space_input_scale(sigmas), coeffs)


def _euler_ancestral(scheduler: SchedulerMixin, steps: int) -> RowSchedule:
    """EulerAncestralDiscreteScheduler.step: deterministic step to sigma_down, noise of sigma_up."""
    sigmas = _sigmas(scheduler)
    coeffs = []
    for i in range(steps):
        s, s_to = sigmas[i], sigmas[i + 1]
        up = math.sqrt(s_to**2 * (s**2 - s_to**2) / s**2)
        down = math.sqrt(max(s_to**2 - up**2, 0.0))
        coeffs.append(_toward_x0(s, down, noise=up))
    return _schedule(scheduler, steps, _sigma_space_input_scale(sigmas), coeffs, ancestral=True)


def _ddim(scheduler: SchedulerMixin, steps: int) -> RowSchedule:
    """DDIMScheduler.step with eta = 0 (the engine's call)."""
    cfg = scheduler.config
    _require(not cfg.clip_sample and not cfg.thresholding, "DDIM clip_sample / thresholding")
    alphas = scheduler.alphas_cumprod.double()
    final = float(scheduler.final_alpha_cumprod)
    stride = cfg.num_train_timesteps // scheduler.num_inference_steps
    coeffs = []
    for t in scheduler.timesteps.tolist():
        a_t = float(alphas[t])
        a_prev = float(alphas[t - stride]) if t - stride >= 0 else final
        p, q = 1.0 / math.sqrt(a_t), -math.sqrt(1.0 - a_t) / math.sqrt(a_t)
        # next = sqrt(a_prev) x0 + sqrt(1 - a_prev) eps, with eps written through x and x0.
        eps_x = math.sqrt((1.0 - a_prev) / (1.0 - a_t))
        coeffs.append((p, q, eps_x, math.sqrt(a_prev) - eps_x * math.sqrt(a_t), 0.0, 0.0))
    return _schedule(scheduler, steps, [1.0] * steps, coeffs)


def _vp(sigma: float) -> tuple[float, float]:
    """(alpha_t, sigma_t) of a sigma-space noise level, as DPMSolverMultistepScheduler uses them."""
    alpha = 1.0 / math.sqrt(sigma * sigma + 1.0)
    return alpha, sigma * alpha


def _dpmpp_2m(scheduler: SchedulerMixin, steps: int) -> RowSchedule:
    """DPMSolverMultistepScheduler.step: dpmsolver++, order 2, midpoint, Karras sigmas.

    The first step is first order (no earlier x0), and so is the last one when
    diffusers lowers it (lower_order_final for < 15 steps, euler_at_final, or a
    zero final sigma, which the default config always has).
    """
    cfg = scheduler.config
    _require(cfg.algorithm_type == "dpmsolver++" and cfg.solver_order == 2, "DPM++ variant other than 2M")
    _require(cfg.solver_type == "midpoint", f"solver_type {cfg.solver_type!r}")
    _require(not cfg.thresholding and not cfg.use_flow_sigmas, "DPM++ thresholding / flow sigmas")
    _require(cfg.variance_type not in ("learned", "learned_range"), "learned variance")
    sigmas = _sigmas(scheduler)
    lower_final = cfg.euler_at_final or (cfg.lower_order_final and steps < 15) or cfg.final_sigmas_type == "zero"
    coeffs = []
    for i in range(steps):
        s, s_to = sigmas[i], sigmas[i + 1]
        alpha_s, sigma_s = _vp(s)
        alpha_t, sigma_t = _vp(s_to)
        p, q = 1.0 / alpha_s, -s  # x0 = (x - sigma_s eps) / alpha_s
        # exp(-h) = sigma_to / sigma: lambda = log(alpha) - log(sigma_t) = -log(sigma).
        gain = alpha_t * (1.0 - s_to / s)
        first_order = i == 0 or (i == steps - 1 and lower_final)
        if first_order:
            coeffs.append((p, q, sigma_t / sigma_s, gain, 0.0, 0.0))
        else:
            r0 = math.log(sigmas[i - 1] / s) / math.log(s / s_to)
            coeffs.append((p, q, sigma_t / sigma_s, gain * (1.0 + 0.5 / r0), 0.0, -gain * 0.5 / r0))
    return _schedule(scheduler, steps, [1.0] * steps, coeffs, keeps_x0=True)


_BUILDERS = {"euler": _euler, "euler_a": _euler_ancestral, "ddim": _ddim, "dpmpp_2m": _dpmpp_2m}


# ---------------------------------------------------------------- batch steps

def _per_row(values: Sequence[Sequence[float]], like: torch.Tensor) -> torch.Tensor:
    """Per-row scalars as a [K, B, 1, 1, 1] fp32 tensor on ``like``'s device, one copy."""
    table = torch.tensor(values, dtype=torch.float32).T.contiguous()
    return to_device_async(table, like.device).view(len(table), -1, *([1] * (like.dim() - 1)))


def _check_rows(latents: torch.Tensor, rows: Sequence[RowState]) -> None:
    if not rows:
        raise ValueError("a batch step needs at least one row")
    if latents.shape[0] != len(rows):
        raise ValueError(f"{latents.shape[0]} latent rows for {len(rows)} row states")
    finished = [k for k, row in enumerate(rows) if row.done]
    if finished:
        raise ValueError(f"rows {finished} have finished their schedule")


def init_latents(noise: torch.Tensor, rows: Sequence[RowState]) -> torch.Tensor:
    """Unit initial noise [B, C, H, W] scaled to each row's starting sigma (fp32)."""
    _check_rows(noise, rows)
    (scale,) = _per_row([[row.schedule.init_sigma] for row in rows], noise)
    return noise.float() * scale


def model_input(latents: torch.Tensor, rows: Sequence[RowState]) -> tuple[torch.Tensor, torch.Tensor]:
    """(scaled latents for the UNet, each row's UNet timestep as a float [B] tensor)."""
    _check_rows(latents, rows)
    c_in, t = _per_row([[row.schedule.c_in[row.index], row.schedule.timesteps[row.index]] for row in rows],
                       latents)
    return latents.float() * c_in, t.view(-1)


def guided_rows(rows: Sequence[RowState]) -> list[int]:
    """Indices of the rows whose current step runs the unconditional row too."""
    return [k for k, row in enumerate(rows) if row.guided]


def guide(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, rows: Sequence[RowState],
          guided: Sequence[int] | None = None) -> torch.Tensor:
    """Classifier-free guidance with each row's own scale, in fp32.

    ``eps_uncond`` holds the rows listed in ``guided`` only (None: every row);
    the other rows take their conditional prediction as it is.
    """
    (scale,) = _per_row([[row.guidance_scale] for row in rows], eps_cond)
    return combine(eps_uncond, eps_cond, scale, guided)


def combine(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, scale: torch.Tensor,
            guided: Sequence[int] | None) -> torch.Tensor:
    """``uncond + scale * (cond - uncond)`` on the ``guided`` rows (None: all), ``cond``
    elsewhere, in fp32. Each row's arithmetic is the same whatever its neighbours."""
    eps_cond = eps_cond.float()
    if guided is None or len(guided) == eps_cond.shape[0]:
        eps_uncond = eps_uncond.float()
        return eps_uncond + scale * (eps_cond - eps_uncond)
    if not guided:
        return eps_cond.clone()
    idx = index_on(guided, eps_cond.device)
    cond_g = eps_cond.index_select(0, idx)
    eps_uncond = eps_uncond.float()
    mixed = eps_uncond + scale.index_select(0, idx) * (cond_g - eps_uncond)
    return eps_cond.index_copy(0, idx, mixed)


def advance(latents: torch.Tensor, eps: torch.Tensor, rows: Sequence[RowState]) -> torch.Tensor:
    """Take every row's current step: the new latents [B, C, H, W] (fp32).

    Updates each row in place: its index moves on, DPM++ 2M rows keep this
    step's x0, ancestral rows draw their noise from their own generator.
    """
    _check_rows(latents, rows)
    coeffs = [row.schedule.coeffs[row.index] for row in rows]
    p, q, a, b, c, d = _per_row(coeffs, latents)
    x = latents.float()
    x0 = p * x + q * eps.float()
    out = a * x + b * x0
    if any(row.schedule.ancestral for row in rows):
        out = out + c * _ancestral_noise(rows, x)
    if any(k[5] != 0.0 for k in coeffs):
        out = out + d * _previous_x0(rows, x0)
    for k, row in enumerate(rows):
        if row.schedule.keeps_x0:
            row.prev = x0[k:k + 1]
        row.index += 1
    return out


def _ancestral_noise(rows: Sequence[RowState], like: torch.Tensor) -> torch.Tensor:
    """Fresh N(0, 1) rows for ancestral rows, zeros elsewhere.

    Each draw is (1, C, H, W) fp32 on the CPU from the row's generator, as
    diffusers' randn_tensor draws it for a list of CPU generators.
    """
    noise = torch.zeros(like.shape, dtype=torch.float32)
    for k, row in enumerate(rows):
        if row.schedule.ancestral:
            noise[k:k + 1] = torch.randn((1, *like.shape[1:]), generator=row.generator, dtype=torch.float32)
    return to_device_async(noise, like.device)


def _previous_x0(rows: Sequence[RowState], like: torch.Tensor) -> torch.Tensor:
    """Each row's previous x0, zeros for rows without one (their d is 0)."""
    zero = torch.zeros_like(like[:1])
    return torch.cat([zero if row.prev is None else row.prev for row in rows])
