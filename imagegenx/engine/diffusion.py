"""The Stable Diffusion engine: diffusers parts driven by our own denoise loop.

``StableDiffusionPipeline.__call__`` treats a batch as one unit. The worker
needs more: a different seed and guidance per sample, samples that leave the
batch mid-way when their request is revoked, and a seed that gives the same
image whether it runs alone or batched. So this module composes the UNet, VAE,
text encoder and a scheduler itself.
"""
from __future__ import annotations

import gc
import inspect
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Collection, Hashable, Sequence
from dataclasses import dataclass
from typing import Any
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.utils import is_accelerate_available
from PIL import Image
from transformers import CLIPTextModel, CLIPTokenizer

from imagegenx import guidance as guidance_rules
from imagegenx.engine.base import BatchSpec, DecodedNow, PendingDecode, StepCallback
from imagegenx.engine import row_samplers
from imagegenx.engine.decode_stream import NOT_FINITE, decode_on_stream
from imagegenx.engine.fastpath import FastPath, FastPathOptions, cfg_unet_eager, optimise_modules
from imagegenx.engine.precompile import UNetCall
from imagegenx.engine.lora import EngineLoras
from imagegenx.engine.preview_gpu import PreviewFrames, Projection, project_states
from imagegenx.engine.samplers import (
    SAMPLERS,
    SchedulerConfig,
    keep_scheduler_rows,
    load_scheduler_config,
    make_scheduler,
)
from imagegenx.engine.step_clock import DeviceStepClock
from imagegenx.engine.tokenizer import MAX_LENGTH
from imagegenx.engine.transfer import to_device_async
from imagegenx.preview import PreviewMap, map_file

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def torch_dtype_of(name: str) -> torch.dtype:
    """The torch dtype of a ``dtype`` setting value (fp32, fp16, bf16)."""
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; expected one of {tuple(DTYPES)}")
    return DTYPES[name]

log = logging.getLogger(__name__)


class PromptCache:
    """LRU cache of text embeddings keyed by the prompt string.

    Serving traffic repeats prompts (and almost always the empty negative
    prompt), so the text encoder runs once per distinct string. Each prompt is
    encoded on its own, never batched with others, so its embedding does not
    depend on which prompts happened to be encoded with it. ``scope`` names the
    text encoder's current weights (its merged LoRAs) and is part of the key.
    """

    def __init__(self, encode: Callable[[str], torch.Tensor], maxsize: int = 256,
                 scope: Callable[[], Hashable] = lambda: ()) -> None:
        self._encode = encode
        self._maxsize = maxsize
        self._scope = scope
        self._entries: OrderedDict[tuple[Hashable, str], torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, prompt: str) -> torch.Tensor:
        key = (self._scope(), prompt)
        with self._lock:
            cached = self._entries.get(key)
            if cached is not None:
                self._entries.move_to_end(key)
                self.hits += 1
                return cached
        value = self._encode(prompt)
        with self._lock:
            self.misses += 1
            self._entries[key] = value
            self._entries.move_to_end(key)
            while len(self._entries) > self._maxsize:
                self._entries.popitem(last=False)
        return value


class _Rows:
    """Per-sample tensors of the samples still in the batch, sliced together."""

    def __init__(
        self,
        indices: list[int],
        latents: torch.Tensor,
        cond: torch.Tensor,
        uncond: torch.Tensor,
        guidance: torch.Tensor,
        generators: list[torch.Generator],
        scales: list[float] | None = None,
        intervals: list[guidance_rules.Interval] | None = None,
    ) -> None:
        self.indices = indices  # positions in BatchSpec.samples
        self.latents = latents
        self.cond = cond
        self.uncond = uncond
        self.guidance = guidance
        self.generators = generators
        self.scales = scales if scales is not None else [float(g) for g in guidance.flatten().tolist()]
        self.intervals = intervals if intervals is not None else [guidance_rules.FULL] * len(indices)

    def guided(self, index: int, steps: int) -> list[int]:
        """Rows that run the unconditional row at step ``index`` of ``steps``."""
        return [k for k, (scale, interval) in enumerate(zip(self.scales, self.intervals))
                if guidance_rules.guided(scale, interval, index, steps)]

    def drop(self, leaving: Collection[int]) -> list[int]:
        """Remove the samples whose spec index is in ``leaving``; return kept rows."""
        keep = [row for row, idx in enumerate(self.indices) if idx not in leaving]
        if len(keep) == len(self.indices):
            return keep
        rows = torch.tensor(keep, dtype=torch.long, device=self.latents.device)
        self.indices = [self.indices[r] for r in keep]
        self.latents = self.latents.index_select(0, rows)
        self.cond = self.cond.index_select(0, rows)
        self.uncond = self.uncond.index_select(0, rows)
        self.guidance = self.guidance.index_select(0, rows)
        self.generators = [self.generators[r] for r in keep]
        self.scales = [self.scales[r] for r in keep]
        self.intervals = [self.intervals[r] for r in keep]
        return keep


@dataclass(eq=False)
class DiffusionDenoising:
    """One request's trajectory under the step scheduler: its images' latents,
    prompt embeddings and per-row sampler states (``row_samplers``)."""

    spec: BatchSpec
    latents: torch.Tensor  # (n, C, h, w) fp32 on the engine's device
    cond: torch.Tensor
    uncond: torch.Tensor
    rows_state: list[row_samplers.RowState]

    @property
    def rows(self) -> int:
        return len(self.rows_state)

    @property
    def unet_rows(self) -> int:
        return sum(2 if r.guided else 1 for r in self.rows_state)

    @property
    def reserved_rows(self) -> int:
        return sum(r.reserved_rows for r in self.rows_state)

    @property
    def steps(self) -> int:
        return self.spec.steps

    @property
    def index(self) -> int:
        return self.rows_state[0].index

    @property
    def done(self) -> bool:
        return self.rows_state[0].done


class DiffusionEngine:
    """Text-to-image with an SD1.x-layout model (UNet, VAE, CLIP text encoder)."""

    def __init__(
        self,
        *,
        unet: UNet2DConditionModel,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        scheduler_config: SchedulerConfig,
        device: torch.device,
        dtype: torch.dtype,
        name: str = "sd",
        prompt_cache_size: int = 256,
        fast_path: FastPathOptions | None = None,
        lora_dir: Path | str | None = None,
    ) -> None:
        self.name = name
        self.unet = unet
        self.vae = vae
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.scheduler_config = scheduler_config
        self.device = device
        self.dtype = dtype
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        # LoRAs are merged into these modules' weights in place (see lora.py).
        self.loras = EngineLoras(lora_dir, unet=unet, text_encoder=text_encoder)
        self.prompt_cache = PromptCache(self._encode_prompt, maxsize=prompt_cache_size,
                                        scope=lambda: self.loras.text_scope)
        # The fast path (fastpath.py) is for CUDA; on the CPU the modules run eagerly.
        if fast_path is not None and not (device.type == "cuda" or fast_path.allow_cpu):
            fast_path = None
        self.fast_options = fast_path
        self.fast: FastPath | None = None
        # The UNet call precompiled elsewhere (a compile-cache artifact); warm-up then skips tracing it.
        self.precompiled_unet: UNetCall | None = None
        # Set to False to run the eager modules (benchmarks compare both).
        self.fast_path_enabled = fast_path is not None
        self.warmup_report: dict[str, object] = {}
        # Previews: the model's fitted latent-to-RGB map (preview.json next to it), or
        # one fitted from its VAE at the first preview (imagegenx.engine.preview_fit).
        self.preview_map: PreviewMap | None = None
        self._projection: Projection | None = None
        # UNet rows run so far (two per guided image and step, one otherwise).
        self.unet_rows_run = 0
        # CUDA: each step's device time, and the loop held to one step ahead of the GPU.
        self._step_clock = (DeviceStepClock(lambda: torch.cuda.Event(enable_timing=True),
                                            stream=lambda: torch.cuda.current_stream(device))
                            if device.type == "cuda" else None)
        # The fast path's VAE decodes under the step scheduler (decode_stream.py), made at the first.
        self._decode_stream: torch.cuda.Stream | None = None
        if fast_path is not None and device.type == "cuda":
            optimise_modules(unet, vae, fuse_qkv=fast_path.fuse_qkv, channels_last=fast_path.channels_last)

    @classmethod
    def load(
        cls,
        model_dir: Path | str,
        device: str = "cpu",
        dtype: str = "fp32",
        *,
        name: str | None = None,
        prompt_cache_size: int = 256,
        fast_path: FastPathOptions | None = None,
        lora_dir: Path | str | None = None,
    ) -> DiffusionEngine:
        """Load a diffusers SD-layout folder from local files only."""
        model_dir = Path(model_dir)
        torch_dtype = torch_dtype_of(dtype)
        where = {"pretrained_model_name_or_path": str(model_dir), "local_files_only": True}
        lazy = {"low_cpu_mem_usage": is_accelerate_available()}
        unet = UNet2DConditionModel.from_pretrained(**where, **lazy, subfolder="unet", torch_dtype=torch_dtype)
        vae = AutoencoderKL.from_pretrained(**where, **lazy, subfolder="vae", torch_dtype=torch_dtype)
        # Cast after loading: the dtype keyword of from_pretrained differs across transformers versions.
        text_encoder = CLIPTextModel.from_pretrained(**where, subfolder="text_encoder").to(torch_dtype)
        tokenizer = CLIPTokenizer.from_pretrained(**where, subfolder="tokenizer")
        if tokenizer.model_max_length > MAX_LENGTH:  # configs without a limit load as "infinite"
            tokenizer.model_max_length = MAX_LENGTH
        engine = cls.on_device(
            unet=unet,
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            scheduler_config=load_scheduler_config(model_dir),
            device=device,
            dtype=torch_dtype,
            name=name or model_dir.name,
            prompt_cache_size=prompt_cache_size,
            fast_path=fast_path,
            lora_dir=lora_dir,
        )
        if map_file(model_dir).is_file():
            engine.preview_map = PreviewMap.load(map_file(model_dir))
        return engine

    @classmethod
    def on_device(cls, *, unet: UNet2DConditionModel, vae: AutoencoderKL, text_encoder: CLIPTextModel,
                  device: str, **options: Any) -> DiffusionEngine:
        """The engine over freshly loaded modules, moved to ``device`` for inference.

        Shared by every loader (folder, single file), so they place and freeze
        the modules the same way.
        """
        dev = torch.device(device)
        for module in (unet, vae, text_encoder):
            module.to(dev).eval().requires_grad_(False)
        return cls(unet=unet, vae=vae, text_encoder=text_encoder, device=dev, **options)

    def device_usable(self) -> bool:
        """After a device error: can this process still use the device? A sticky
        CUDA error (illegal memory access, device-side assert, a GPU off the bus)
        makes every later call fail, this probe's synchronize, launch and copy
        included; after any other the probe passes."""
        if self.device.type != "cuda":
            return True
        try:
            torch.cuda.synchronize(self.device)
            return bool(torch.ones(1, device=self.device).add_(1).item() == 2.0)
        except Exception:  # noqa: BLE001 - any failure is the answer
            return False

    def release_memory(self) -> None:
        """Free memory a failed batch left behind (called before a smaller retry)."""
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    @property
    def native_size(self) -> tuple[int, int]:
        size = self.unet.config.sample_size
        h, w = (size, size) if isinstance(size, int) else size
        return (w * self.vae_scale_factor, h * self.vae_scale_factor)

    @property
    def samplers(self) -> tuple[str, ...]:
        return SAMPLERS

    def warmup(self) -> dict[str, object]:
        """Prepare the fast path: compile, then capture every batch-size bucket.

        Runs once, before the worker takes work; without a fast path (CPU) it
        does nothing. Returns what was prepared and the seconds it took.
        """
        if self.fast_options is None or self.fast is not None:
            return self.warmup_report
        t0 = time.perf_counter()
        width, height = self.native_size
        f = self.vae_scale_factor
        sample_shape = (self.unet.config.in_channels, height // f, width // f)
        context_shape = (self.tokenizer.model_max_length, self.text_encoder.config.hidden_size)
        fast = FastPath(unet=self.unet, vae=self.vae, text_encoder=self.text_encoder, device=self.device,
                        dtype=self.dtype, sample_shape=sample_shape, context_shape=context_shape,
                        options=self.fast_options, precompiled_unet=self.precompiled_unet)
        report = fast.prepare(check_ids=self._token_ids("a photo of a cat"))
        self.fast = fast
        report["warmup_s"] = time.perf_counter() - t0
        self.warmup_report = report
        log.info("fast path ready in %.1f s: buckets %s, compile %s, CUDA graphs %s (UNet %.1f s, VAE %.1f s; "
                 "%s graphs compiled; UNet precompiled %s)", report["warmup_s"], report["buckets"], report["compile"],
                 report["cuda_graphs"], report["unet_s"], report["vae_s"], report.get("compiled_graphs", 0),
                 report.get("unet_precompiled", False))
        return report

    def _fast_ready(self) -> FastPath | None:
        if not self.fast_path_enabled or self.fast_options is None:
            return None
        if self.fast is None:
            self.warmup()
        return self.fast

    def _token_ids(self, prompt: str) -> torch.Tensor:
        ids = self.tokenizer(
            prompt,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        return to_device_async(ids, self.device)

    def _encode_prompt(self, prompt: str) -> torch.Tensor:
        """CLIP's last hidden state for ``prompt``, padded to 77 tokens: (1, 77, D)."""
        ids = self._token_ids(prompt)
        fast = self.fast if self.fast_path_enabled else None
        with torch.inference_mode():
            if fast is not None and fast.encode_text is not None:
                return fast.encode_text(ids).to(self.dtype)
            return self.text_encoder(ids)[0].to(self.dtype)

    def _check(self, spec: BatchSpec) -> None:
        if spec.sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {spec.sampler!r}; expected one of {SAMPLERS}")
        f = self.vae_scale_factor
        for side in (spec.width, spec.height):
            if side <= 0 or side % f:
                raise ValueError(f"sides must be positive multiples of {f}, got {spec.width}x{spec.height}")
        if spec.steps < 1:
            raise ValueError(f"steps must be >= 1, got {spec.steps}")

    def initial_latents(
        self, seeds: Sequence[int], width: int, height: int
    ) -> tuple[torch.Tensor, list[torch.Generator]]:
        """Unscaled starting noise, one CPU generator per sample.

        Each sample draws its own (1, C, h, w) block from a generator seeded with
        its seed, on the CPU, so the noise is the same on every device and for
        every batch composition. The generators are returned because ancestral
        samplers keep drawing per-sample noise from them.
        """
        f = self.vae_scale_factor
        shape = (1, self.unet.config.in_channels, height // f, width // f)
        generators = [torch.Generator(device="cpu").manual_seed(seed) for seed in seeds]
        noise = [torch.randn(shape, generator=g, dtype=torch.float32) for g in generators]
        return to_device_async(torch.cat(noise), self.device), generators

    def generate(self, spec: BatchSpec, on_step: StepCallback | None = None) -> list[Image.Image | None]:
        """Draw every sample of ``spec``; see :class:`imagegenx.engine.base.Engine`.

        ``on_step`` runs before the first step, after every step and thus
        ``steps + 1`` times, with (steps_done, steps_total). Latents and the
        scheduler math stay in fp32 whatever the model dtype.
        """
        self._check(spec)
        samples = spec.samples
        results: list[Image.Image | None] = [None] * len(samples)
        if not samples:
            return results
        fast = self._fast_ready()
        self.loras.use(spec.loras)  # merged in place: compiled code and CUDA graphs stay valid
        with torch.inference_mode():
            scheduler = make_scheduler(spec.sampler, self.scheduler_config)
            scheduler.set_timesteps(spec.steps, device=self.device)
            timesteps = scheduler.timesteps
            total = len(timesteps)
            step_params = inspect.signature(scheduler.step).parameters
            noise, generators = self.initial_latents([s.seed for s in samples], spec.width, spec.height)
            rows = _Rows(
                indices=list(range(len(samples))),
                latents=noise * scheduler.init_noise_sigma,
                cond=torch.cat([self.prompt_cache.get(s.prompt) for s in samples]),
                uncond=torch.cat([self.prompt_cache.get(s.negative_prompt) for s in samples]),
                guidance=torch.tensor(
                    [s.guidance_scale for s in samples], dtype=torch.float32, device=self.device
                ).view(-1, 1, 1, 1),
                generators=generators,
                scales=[s.guidance_scale for s in samples],
                intervals=[s.guidance_interval for s in samples],
            )

            def boundary(done: int) -> bool:
                """Apply the callback's drops; False once no sample is left."""
                if on_step is not None:
                    leaving = set(on_step(done, total)) & set(rows.indices)
                    if leaving:
                        keep_scheduler_rows(scheduler, rows.drop(leaving))
                return bool(rows.indices)

            for i, t in enumerate(timesteps):
                if not boundary(i):
                    return results
                model_in = scheduler.scale_model_input(rows.latents, t)
                guided = rows.guided(i, total)
                if fast is not None:
                    eps_uncond, eps_cond = fast.unet(model_in, t, rows.uncond, rows.cond, guided)
                else:
                    eps_uncond, eps_cond = cfg_unet_eager(
                        self.unet, self.dtype, model_in, t, rows.uncond, rows.cond, guided
                    )
                self.unet_rows_run += eps_uncond.shape[0] + eps_cond.shape[0]
                eps = row_samplers.combine(eps_uncond, eps_cond, rows.guidance, guided)
                extra = {"generator": rows.generators} if "generator" in step_params else {}
                rows.latents = scheduler.step(eps, t, rows.latents, **extra).prev_sample
            if not boundary(total):
                return results
            for idx, image in zip(rows.indices, self.decode_latents(rows.latents, fast), strict=True):
                results[idx] = image
        return results

    # -- step API (the step scheduler: imagegenx.engine.base.StepEngine) ---------
    def begin(self, spec: BatchSpec) -> DiffusionDenoising:
        """One request's trajectory: noise from each image's own seed, prompt
        embeddings (cached) and each row's schedule, ready for its first step."""
        self._check(spec)
        samples = spec.samples
        if not samples:
            raise ValueError("a request needs at least one image")
        self._fast_ready()
        self.loras.use(spec.loras)  # the text encoder's LoRAs shape the embeddings
        with torch.inference_mode():
            noise, generators = self.initial_latents([s.seed for s in samples], spec.width, spec.height)
            rows = [row_samplers.start_row(spec.sampler, spec.steps, self.scheduler_config, g,
                                           s.guidance_scale, s.guidance_interval)
                    for s, g in zip(samples, generators)]
            return DiffusionDenoising(
                spec=spec,
                latents=row_samplers.init_latents(noise, rows),
                cond=torch.cat([self.prompt_cache.get(s.prompt) for s in samples]),
                uncond=torch.cat([self.prompt_cache.get(s.negative_prompt) for s in samples]),
                rows_state=rows,
            )

    def step(self, states: Sequence[DiffusionDenoising]) -> None:
        """One UNet call (padded to its CUDA-graph bucket on the fast path) for every
        row of ``states``, each at its own timestep; then each row's own sampler step.

        Nothing is written back until the call succeeded, so a failed call can be
        retried with the same states.
        """
        fast = self._fast_ready()
        self.loras.use(states[0].spec.loras)
        rows = [r for s in states for r in s.rows_state]
        clock = self._step_clock
        if clock is not None:
            clock.begin()
        try:
            self._step(states, rows, fast, clock)
        except BaseException:
            if clock is not None:
                clock.abandon()
            raise

    def _step(self, states: Sequence[DiffusionDenoising], rows: list[row_samplers.RowState],
              fast: FastPath | None, clock: DeviceStepClock | None) -> None:
        with torch.inference_mode():
            latents = torch.cat([s.latents for s in states])
            cond = torch.cat([s.cond for s in states])
            uncond = torch.cat([s.uncond for s in states])
            model_in, t = row_samplers.model_input(latents, rows)
            guided = row_samplers.guided_rows(rows)
            if fast is not None:
                eps_uncond, eps_cond = fast.unet(model_in, t, uncond, cond, guided)
            else:
                eps_uncond, eps_cond = cfg_unet_eager(self.unet, self.dtype, model_in, t, uncond, cond,
                                                      guided)
            eps = row_samplers.guide(eps_uncond, eps_cond, rows, guided)
            unet_rows = eps_uncond.shape[0] + eps_cond.shape[0]
            if clock is not None:
                # Nothing in a step waits for the device (inputs are copied without a
                # sync), so the host prepares the next call while the GPU runs this one.
                # One step ahead, no further, and before any state is written back: an
                # error of the previous call surfaces here, with these rows unmoved.
                clock.wait_for_previous()
            latents = row_samplers.advance(latents, eps, rows)
            if clock is not None:
                clock.end()
        self.unet_rows_run += unet_rows
        start = 0
        for s in states:
            s.latents = latents[start:start + s.rows]
            start += s.rows

    @property
    def times_steps_on_device(self) -> bool:
        """Whether ``step`` returns before the device has run it, its time reported
        later by ``ended_step_seconds`` (CUDA)."""
        return self._step_clock is not None

    def ended_step_seconds(self, wait: bool = False) -> list[float] | None:
        """Device seconds of each step that has ended on the GPU since the last call,
        oldest first (with ``wait``: of every step, once the last has ended); None
        off CUDA, where a step has ended when ``step`` returns."""
        return None if self._step_clock is None else self._step_clock.take_ended(wait)

    def preview(self, states: Sequence[DiffusionDenoising]) -> PreviewFrames:
        """Cheap previews of the running latents of ``states`` (only those): the
        latent-to-RGB projection on the device, copied to the host without waiting."""
        if self._projection is None:
            if self.preview_map is None:
                self.preview_map = self._fit_preview_map()
            self._projection = Projection(self.preview_map, self.device)
        return project_states(self._projection, [s.latents for s in states])

    def _fit_preview_map(self) -> PreviewMap:
        from imagegenx.engine.preview_fit import fit

        t0 = time.perf_counter()
        with torch.inference_mode():
            fitted = fit(self.vae, count=64, source=f"{self.name} VAE, fitted at the first preview")
        log.warning("no preview.json with model %s: fitted a preview map from its VAE in %.1f s "
                    "(held-out correlation %s); write one with python -m imagegenx.shapes.fit_preview",
                    self.name, time.perf_counter() - t0, (fitted.info or {}).get("correlation"))
        return fitted

    def step_seconds(self, rows: int) -> float | None:
        """Measured seconds of one UNet call of ``rows`` UNet rows on the fast path
        (timed per bucket at warm-up); None without it (the cost is not known)."""
        fast = self.fast if self.fast_path_enabled else None
        return fast.unet.step_seconds(rows) if fast is not None else None

    def decode(self, states: Sequence[DiffusionDenoising]) -> list[list[Image.Image]]:
        """Batched VAE decode of finished states, one list of images per state.

        A state whose latents are not finite (the model diverged) raises, so the
        caller decodes one state at a time and only that request fails.
        """
        # Inside inference mode from the concatenation on: outside it, ``cat`` of
        # inference tensors makes an ordinary tensor, whose other dispatch keys fail
        # the compiled decode's guards and compile it again (the first finished
        # request of a worker then waited for a VAE compile).
        with torch.inference_mode():
            latents = torch.cat([s.latents for s in states])
            finite = torch.isfinite(latents).flatten(1).all(1).tolist()  # one sync for all rows
            if not all(finite):
                raise ValueError(NOT_FINITE)
            images = self.decode_latents(latents, self._fast_ready())
        out, start = [], 0
        for s in states:
            out.append(images[start:start + s.rows])
            start += s.rows
        return out

    def start_decode(self, states: Sequence[DiffusionDenoising]) -> PendingDecode:
        """Decode finished states together on the decode stream, without waiting
        (``decode_stream``); a state whose latents are not finite gets its own
        error. Without the stream (CPU, eager modules, another size), decoded now."""
        fast = self._fast_ready()
        if (fast is None or not fast.options.decode_stream or self.device.type != "cuda"
                or not all(fast.decode.covers(s.latents) for s in states)):
            return DecodedNow(list(self.decode(states)))
        if self._decode_stream is None:
            self._decode_stream = torch.cuda.Stream(self.device)
        return decode_on_stream([s.latents for s in states], fast.decode, self._decode_stream)

    def decode_latents(self, latents: torch.Tensor, fast: FastPath | None = None) -> list[Image.Image]:
        """Batched VAE decode of final latents to RGB images."""
        if fast is not None and fast.decode.covers(latents):
            return [Image.fromarray(a) for a in fast.decode(latents).cpu().numpy()]
        scaled = (latents / self.vae.config.scaling_factor).to(self.vae.dtype)
        pixels = self.vae.decode(scaled).sample.float()
        pixels = (pixels / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)
        array = (pixels * 255).round().to(torch.uint8).cpu().numpy()
        return [Image.fromarray(a) for a in array]
