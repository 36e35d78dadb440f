"""The GPU fast path of the diffusion engine.

On CUDA the engine runs its three networks through this module:

- the UNet and the VAE get fused QKV projections (``fuse_qkv_projections``)
  and channels_last weights; attention is PyTorch's SDPA (diffusers' default
  processor, kept by the fused one);
- the UNet is compiled once with ``torch.compile`` with a dynamic batch
  dimension (its upsamplers get a branch-free forward, ``upsample.py``, so
  the batch size never splits the graph), and one CUDA graph is captured around the compiled call per
  bucket of UNet rows (each configured image bucket and its double: by
  default 2, 4, ... 64 rows; one row runs padded to two, since a batch of 1
  would compile the UNet again), over static input and output buffers. A step
  runs two rows per image inside its guidance interval and one per other
  image; the rows run in the smallest bucket that holds them, padded with
  dummy rows whose outputs are dropped; more rows than the largest bucket run
  as several bucket calls per step;
- the VAE decode (with the conversion to uint8 pixels) is compiled with a
  dynamic batch dimension and runs in chunks of at most the largest bucket;
- the text encoder, which the prompt cache calls once per distinct prompt,
  replays a CUDA graph captured for one prompt.

Graphs are captured at the model's native size only; other sizes run the
eager modules. Compiling and capturing takes time, so it is done once by
:meth:`FastPath.prepare` (``DiffusionEngine.warmup()``), which the worker
calls before it takes work. On the CPU the engine uses none of this.

Rows of a batch never mix inside the networks (normalisation and attention
are per sample), so padding rows cannot change the real rows' results; only
the kernels chosen for each batch size differ, which moves results by
rounding only.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from imagegenx.engine.buckets import bucket_for, split_rows  # noqa: F401 - bucket_for: re-exported
from imagegenx.engine.precompile import UNetCall
from imagegenx.engine.transfer import index_on
from imagegenx.engine.upsample import single_branch_upsamplers
from imagegenx.errors import first_line, is_device_error, is_out_of_memory

log = logging.getLogger(__name__)

DEFAULT_BUCKETS: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
WARMUP_CALLS = 2  # eager calls per bucket before capture: compile, then autotune for the size


@dataclass(frozen=True)
class FastPathOptions:
    """What the fast path may use. ``allow_cpu`` runs the bucket logic on the
    CPU (no graphs there); it exists for tests of that logic."""

    compile: bool = True
    cuda_graphs: bool = True
    buckets: tuple[int, ...] = DEFAULT_BUCKETS
    fuse_qkv: bool = True
    channels_last: bool = True
    text_encoder_graph: bool = True
    # Step scheduler: VAE decodes on a stream of their own, overlapped with UNet calls.
    decode_stream: bool = True
    allow_cpu: bool = False

    def __post_init__(self) -> None:
        buckets = tuple(self.buckets)
        if not buckets or any(int(b) < 1 for b in buckets) or list(buckets) != sorted(set(buckets)):
            raise ValueError(f"batch buckets must be distinct positive sizes in ascending order, got {buckets}")
        object.__setattr__(self, "buckets", tuple(int(b) for b in buckets))


def optimise_modules(*modules: torch.nn.Module, fuse_qkv: bool, channels_last: bool) -> None:
    """Fused QKV projections and channels_last weights, where the module supports them."""
    for module in modules:
        if fuse_qkv and hasattr(module, "fuse_qkv_projections"):
            try:
                module.fuse_qkv_projections()
            except (ValueError, AttributeError, NotImplementedError) as exc:  # e.g. added-KV attention
                log.warning("fused QKV not applied to %s: %s", type(module).__name__, exc)
        if channels_last:
            module.to(memory_format=torch.channels_last)


# The compiler backend; tests count compiled graphs with a counting backend instead.
COMPILE_BACKEND: Any = "inductor"
# How the batch dimension is traced; compiled artifacts record it, so one built when
# the 1-row bucket had its own UNet graph is refused instead of missing the cache.
BATCH_TRACING = "rows-from-2"


def _compile(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``torch.compile`` with a dynamic batch dimension (``_mark_batch_dynamic``).

    Every compiled call holds at least two rows (``unet_row_buckets``; the VAE
    decode pads one image to two), so one graph serves every bucket.
    """
    import torch._inductor.config as inductor_config

    # 1x1 convolutions as matrix products: cheaper on tensor cores, no extra compile time.
    inductor_config.conv_1x1_as_mm = True
    return torch.compile(fn, backend=COMPILE_BACKEND, dynamic=None)


def _mark_batch_dynamic(*tensors: torch.Tensor) -> None:
    for t in tensors:
        torch._dynamo.maybe_mark_dynamic(t, 0)


def _warm_on_side_stream(fn: Callable[[], Any], device: torch.device, calls: int) -> None:
    """Run ``fn`` before a capture, on a side stream as CUDA graph capture expects."""
    if device.type != "cuda":
        for _ in range(calls):
            fn()
        return
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(calls):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)


def guided_batch(
    latents: torch.Tensor, t: torch.Tensor | float, uncond: torch.Tensor, cond: torch.Tensor,
    guided: Sequence[int] | None,
) -> tuple[torch.Tensor, torch.Tensor | float, torch.Tensor, int]:
    """The UNet rows of a guided step: [uncond rows of ``guided``; cond rows of all].

    ``guided`` lists the image rows that run classifier-free guidance at this
    step (None: all of them); the others run their conditional row only.
    Returns (UNet input, timesteps, context, number of unconditional rows). With
    every row guided this is the classic [uncond; cond] batch of 2n rows.
    """
    n = latents.shape[0]
    per_row = isinstance(t, torch.Tensor) and t.ndim == 1 and t.numel() == n
    if guided is None or len(guided) == n:
        x, ctx = torch.cat([latents, latents]), torch.cat([uncond, cond])
        return x, (torch.cat([t, t]) if per_row else t), ctx, n
    if not guided:
        return latents, t, cond, 0
    idx = index_on(guided, latents.device)
    x = torch.cat([latents.index_select(0, idx), latents])
    ctx = torch.cat([uncond.index_select(0, idx.to(uncond.device)), cond])
    if per_row:
        assert isinstance(t, torch.Tensor)
        t = torch.cat([t.index_select(0, idx.to(t.device)), t])
    return x, t, ctx, len(guided)


def cfg_unet_eager(
    unet: torch.nn.Module, dtype: torch.dtype, latents: torch.Tensor, t: torch.Tensor,
    uncond: torch.Tensor, cond: torch.Tensor, guided: Sequence[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One eager UNet call on [uncond rows of ``guided``; cond rows]: (eps_uncond of the
    guided rows, eps_cond of every row) in fp32.

    ``t`` is one timestep for every row (0-d) or one per latents row (step scheduler).
    """
    x, t, ctx, k = guided_batch(latents, t, uncond, cond, guided)
    eps = unet(x.to(dtype), t, encoder_hidden_states=ctx).sample.float()
    return eps[:k], eps[k:]


def unet_row_buckets(image_buckets: Sequence[int]) -> tuple[int, ...]:
    """UNet-row buckets of the image buckets: each size and its double, from 2.

    A call runs two rows per guided image and one per other image, so any row
    count may occur; the image buckets (1, 2, 4, ... 32 images) give row buckets
    2, 4, ... 64. There is no 1-row bucket: a single row runs padded to two,
    because a batch of 1 compiles the UNet a second time. Dynamo specialises a
    dimension of size 1, and on CUDA Inductor's indexing check bounds the batch
    from 2 even when it is traced size-obliviously (docs/BENCHMARKS.md 11d and
    11e: 3 graphs with the 1-row bucket, 2 without; marking the batch unbacked
    broke the UNet into 59 graphs). The padding costs one row's compute on the
    steps a request runs alone and unguided.
    """
    return tuple(sorted({max(2, b) for b in image_buckets} | {2 * b for b in image_buckets}))


def example_rows(rows: int, sample_shape: Sequence[int], context_shape: Sequence[int], *,
                 device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Seeded UNet inputs of ``rows`` rows (latents, timesteps, context), as the fast path
    calls the UNet: one float32 timestep per row, since the step scheduler runs every row
    at its own step. Used for slot buffers, warm-up and precompile examples."""
    gen = torch.Generator(device="cpu").manual_seed(rows)
    x = torch.randn((rows, *sample_shape), generator=gen).to(device=device, dtype=dtype)
    ctx = torch.randn((rows, *context_shape), generator=gen).to(device=device, dtype=dtype)
    t = torch.full((rows,), 500.0, dtype=torch.float32, device=device)
    return x, t, ctx


class _UNetSlot:
    """Static buffers of one bucket of UNet rows and, on CUDA, the graph captured
    over them."""

    def __init__(
        self,
        bucket: int,
        fn: Callable[..., Any],
        *,
        dtype: torch.dtype,
        device: torch.device,
        sample_shape: tuple[int, ...],
        context_shape: tuple[int, ...],
        compiled: bool,
        graph: bool,
        pool: Any,
    ) -> None:
        self.bucket = bucket
        self.x, self.t, self.ctx = example_rows(bucket, sample_shape, context_shape, device=device, dtype=dtype)
        if compiled:
            _mark_batch_dynamic(self.x, self.ctx, self.t)
        self._fn = fn
        self.graph: torch.cuda.CUDAGraph | None = None
        self.out: torch.Tensor | None = None
        _warm_on_side_stream(self._call, device, WARMUP_CALLS)
        if graph:
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=pool):
                self.out = self._call()
            self.graph = g

    def _call(self) -> torch.Tensor:
        return self._fn(self.x, self.t, encoder_hidden_states=self.ctx, return_dict=False)[0]

    def run(self, x: torch.Tensor, t: torch.Tensor | float, ctx: torch.Tensor) -> torch.Tensor:
        """UNet outputs (fp32) of the ``k`` rows of ``x``, padded to the bucket."""
        k = x.shape[0]
        self.x[:k].copy_(x)
        self.ctx[:k].copy_(ctx)
        if isinstance(t, torch.Tensor) and t.ndim == 1 and t.numel() == k:
            self.t[:k].copy_(t)
        elif isinstance(t, torch.Tensor):
            self.t.copy_(t.reshape(()).expand_as(self.t))
        else:
            self.t.fill_(float(t))
        if self.graph is not None:
            self.graph.replay()
            out = self.out
            assert out is not None
        else:
            out = self._call()
        # A copy: the graph's output buffer is overwritten by the next replay.
        return out[:k].to(torch.float32, copy=True)


def _as_unet_fn(call: UNetCall) -> Callable[..., tuple[torch.Tensor]]:
    """A precompiled UNet call, with the UNet's own signature (as the slots call it)."""
    def fn(x: torch.Tensor, t: torch.Tensor, *, encoder_hidden_states: torch.Tensor,
           return_dict: bool = False) -> tuple[torch.Tensor]:
        return (call(x, t, encoder_hidden_states),)

    return fn


class BucketedCFGUNet:
    """The UNet with classifier-free guidance, in padded buckets of UNet rows.

    A step of n images runs 2 rows per guided image and 1 per other one; the
    rows run in the smallest row bucket that holds them (``unet_row_buckets``
    of the configured image buckets), or in several bucket calls beyond the
    largest.
    """

    def __init__(
        self,
        unet: torch.nn.Module,
        *,
        dtype: torch.dtype,
        device: torch.device,
        sample_shape: tuple[int, ...],
        context_shape: tuple[int, ...],
        options: FastPathOptions,
        precompiled: UNetCall | None = None,
    ) -> None:
        self.unet = unet
        self.dtype = dtype
        self.device = device
        self.sample_shape = tuple(sample_shape)
        self.context_shape = tuple(context_shape)
        self.options = options
        self.buckets = unet_row_buckets(options.buckets)
        self.compiled = options.compile
        self.graphs = options.cuda_graphs and device.type == "cuda"
        if self.compiled:
            # One compile for every bucket (diffusers' Upsample2D branches on the batch size).
            single_branch_upsamplers(unet)
        # A precompiled call (``precompile.py``, from a compile-cache artifact) replaces the
        # compile: no Dynamo tracing at start. Its graph is dynamic in the batch already, so
        # the slots' inputs need no marking.
        self.precompiled = precompiled is not None
        if precompiled is not None:
            self.fn = _as_unet_fn(precompiled)
        else:
            self.fn = _compile(unet) if self.compiled else unet
        self.pool = torch.cuda.graph_pool_handle() if self.graphs else None
        self.slots: dict[int, _UNetSlot] = {}
        # Measured seconds of one call per row bucket (``measure``): the step scheduler's cost model.
        self.call_s: dict[int, float] = {}

    def prepare(self, buckets: Sequence[int] | None = None) -> dict[int, float]:
        """Compile (first bucket) and capture every row bucket; seconds per bucket.

        Buckets are prepared largest first, so that the shared graph memory pool
        is sized by the largest one and the smaller ones reuse it.
        """
        seconds: dict[int, float] = {}
        for b in sorted(buckets or self.buckets, reverse=True):
            t0 = time.perf_counter()
            self._slot(b)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            seconds[b] = time.perf_counter() - t0
        return seconds

    def measure(self, calls: int = 5) -> dict[int, float]:
        """Seconds of one call of each prepared row bucket (median of ``calls``), so
        the step scheduler knows what another row costs on this card and model."""
        for b, slot in sorted(self.slots.items()):
            x = slot.x.clone()
            ctx = slot.ctx.clone()
            t = slot.t.clone()
            times = []
            for _ in range(calls):
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                t0 = time.perf_counter()
                slot.run(x, t, ctx)
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                times.append(time.perf_counter() - t0)
            self.call_s[b] = sorted(times)[len(times) // 2]
        return dict(self.call_s)

    def step_seconds(self, rows: int) -> float | None:
        """Estimated seconds of one call of ``rows`` UNet rows (None before ``measure``)."""
        if not self.call_s:
            return None
        return sum(self.call_s[bucket] for _, _, bucket in split_rows(rows, self.buckets))

    def _slot(self, bucket: int) -> _UNetSlot:
        slot = self.slots.get(bucket)
        if slot is not None:
            return slot
        if self.precompiled:
            self._probe_precompiled(bucket)
        try:
            slot = self._new_slot(bucket)
        except Exception as exc:
            if not self.precompiled or is_out_of_memory(exc) or is_device_error(exc):
                raise
            self._compile_instead(bucket, exc)
            slot = self._new_slot(bucket)
        self.slots[bucket] = slot
        return slot

    def _probe_precompiled(self, rows: int) -> None:
        """Call the precompiled UNet once, outside any graph capture, before a slot uses it:
        a file whose guards or code do not fit this process fails here, and every slot
        is then built with the compiled UNet instead (none is left half on each)."""
        x, t, ctx = example_rows(rows, self.sample_shape, self.context_shape, device=self.device, dtype=self.dtype)
        try:
            self.fn(x, t, encoder_hidden_states=ctx, return_dict=False)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
        except Exception as exc:
            if is_out_of_memory(exc) or is_device_error(exc):
                raise
            self._compile_instead(rows, exc)

    def _compile_instead(self, rows: int, exc: Exception) -> None:
        """The precompiled UNet failed: trace and compile it, and rebuild any slot built on it."""
        log.warning("precompiled UNet failed on %s rows (%s); compiling it instead", rows, first_line(exc))
        self.precompiled = False
        self.fn = _compile(self.unet)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        for bucket in sorted(self.slots, reverse=True):
            self.slots[bucket] = self._new_slot(bucket)

    def _new_slot(self, bucket: int) -> _UNetSlot:
        return _UNetSlot(
            bucket, self.fn, dtype=self.dtype, device=self.device, sample_shape=self.sample_shape,
            context_shape=self.context_shape, compiled=self.compiled and not self.precompiled,
            graph=self.graphs, pool=self.pool,
        )

    def covers(self, latents: torch.Tensor, context: torch.Tensor) -> bool:
        return (tuple(latents.shape[1:]) == self.sample_shape
                and tuple(context.shape[1:]) == self.context_shape)

    def __call__(
        self, latents: torch.Tensor, t: torch.Tensor, uncond: torch.Tensor, cond: torch.Tensor,
        guided: Sequence[int] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(eps_uncond of the ``guided`` rows, eps_cond of every row), fp32."""
        if not self.covers(latents, cond):
            return cfg_unet_eager(self.unet, self.dtype, latents, t, uncond, cond, guided)
        x, tt, ctx, k = guided_batch(latents, t, uncond, cond, guided)
        per_row = isinstance(tt, torch.Tensor) and tt.ndim == 1 and tt.numel() == x.shape[0]
        pieces = [
            self._slot(bucket).run(x[s:s + n], tt[s:s + n] if per_row else tt, ctx[s:s + n])
            for s, n, bucket in split_rows(x.shape[0], self.buckets)
        ]
        eps = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
        return eps[:k], eps[k:]


def _latents_to_pixels(vae: torch.nn.Module, latents: torch.Tensor) -> torch.Tensor:
    """Final latents (fp32) to uint8 NHWC pixels."""
    scaled = (latents / vae.config.scaling_factor).to(vae.dtype)
    pixels = vae.decode(scaled, return_dict=False)[0].float()
    pixels = (pixels / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)
    return (pixels * 255).round().to(torch.uint8)


class Decoder:
    """Batched VAE decode to uint8 pixels, compiled with a dynamic batch dimension.

    Runs in chunks of at most the largest bucket. The compiled function is never
    called with one row (a batch dimension of 1 would be specialised and
    compiled again): a single image is decoded with a copy of itself.
    """

    def __init__(
        self, vae: torch.nn.Module, *, device: torch.device, latent_shape: tuple[int, ...],
        options: FastPathOptions,
    ) -> None:
        self.vae = vae
        self.device = device
        self.latent_shape = tuple(latent_shape)
        self.options = options
        self.compiled = options.compile

        def decode(latents: torch.Tensor) -> torch.Tensor:
            return _latents_to_pixels(vae, latents)

        self.fn = _compile(decode) if self.compiled else decode

    def prepare(self) -> dict[int, float]:
        """Compile (first call) and tune for every bucket size; seconds per bucket."""
        seconds: dict[int, float] = {}
        for b in sorted(self.options.buckets, reverse=True):
            t0 = time.perf_counter()
            self(torch.randn((b, *self.latent_shape), device=self.device))
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            seconds[b] = time.perf_counter() - t0
        return seconds

    def covers(self, latents: torch.Tensor) -> bool:
        """Only the native size is compiled; other sizes decode eagerly."""
        return tuple(latents.shape[1:]) == self.latent_shape

    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        largest = self.options.buckets[-1]
        outs = []
        for s in range(0, latents.shape[0], largest):
            chunk = latents[s:s + largest].contiguous()
            rows = chunk.shape[0]
            if self.compiled and rows == 1:
                chunk = torch.cat([chunk, chunk])
            if self.compiled:
                _mark_batch_dynamic(chunk)
            outs.append(self.fn(chunk)[:rows])
        return outs[0] if len(outs) == 1 else torch.cat(outs)


class GraphedTextEncoder:
    """The text encoder for one prompt of token ids, replayed from a CUDA graph."""

    def __init__(self, text_encoder: torch.nn.Module, *, device: torch.device, seq_len: int) -> None:
        self.text_encoder = text_encoder
        self.ids = torch.zeros((1, seq_len), dtype=torch.long, device=device)
        _warm_on_side_stream(lambda: text_encoder(self.ids)[0], device, WARMUP_CALLS)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = text_encoder(self.ids)[0]

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        self.ids.copy_(ids)
        self.graph.replay()
        return self.out.clone()


class FastPath:
    """The engine's fast modules: built by the engine, prepared by :meth:`prepare`."""

    def __init__(
        self,
        *,
        unet: torch.nn.Module,
        vae: torch.nn.Module,
        text_encoder: torch.nn.Module,
        device: torch.device,
        dtype: torch.dtype,
        sample_shape: tuple[int, ...],
        context_shape: tuple[int, ...],
        options: FastPathOptions,
        precompiled_unet: UNetCall | None = None,
    ) -> None:
        self.options = options
        self.device = device
        self.sample_shape = tuple(sample_shape)
        self.context_shape = tuple(context_shape)
        self.text_encoder = text_encoder
        self.unet = BucketedCFGUNet(unet, dtype=dtype, device=device, sample_shape=sample_shape,
                                    context_shape=context_shape, options=options, precompiled=precompiled_unet)
        self.decode = Decoder(vae, device=device, latent_shape=sample_shape, options=options)
        self.encode_text: Callable[[torch.Tensor], torch.Tensor] | None = None
        self.report: dict[str, Any] = {}

    def prepare(self, check_ids: torch.Tensor | None = None) -> dict[str, Any]:
        """Compile and capture everything; returns what it did and how long it took."""
        t_start = time.perf_counter()
        report: dict[str, Any] = {
            "buckets": list(self.options.buckets),
            "compile": self.options.compile,
            "cuda_graphs": self.unet.graphs,
        }
        with torch.inference_mode():
            t0 = time.perf_counter()
            if self.options.text_encoder_graph and self.device.type == "cuda":
                self.encode_text = self._capture_text_encoder(check_ids)
            report["text_encoder_graph"] = self.encode_text is not None
            report["text_encoder_s"] = time.perf_counter() - t0
            report["unet_bucket_s"] = self.unet.prepare()
            report["unet_s"] = sum(report["unet_bucket_s"].values())
            report["unet_call_s"] = self.unet.measure()
            report["vae_bucket_s"] = self.decode.prepare()
            report["vae_s"] = sum(report["vae_bucket_s"].values())
        report["captured_buckets"] = sorted(self.unet.slots)
        report["unet_precompiled"] = self.unet.precompiled
        if self.options.compile:  # graphs Dynamo compiled in this process (1 UNet + 1 VAE decode expected)
            from torch._dynamo.utils import counters

            report["compiled_graphs"] = int(counters["stats"]["unique_graphs"])
        report["total_s"] = time.perf_counter() - t_start
        self.report = report
        return report

    def _capture_text_encoder(self, check_ids: torch.Tensor | None) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """Capture the text encoder; keep it only if it matches the eager call."""
        try:
            graphed = GraphedTextEncoder(self.text_encoder, device=self.device, seq_len=self.context_shape[0])
            if check_ids is not None:
                want = self.text_encoder(check_ids)[0].float()
                got = graphed(check_ids).float()
                err = float((got - want).norm() / want.norm().clamp_min(1e-12))
                if not err < 1e-2:
                    log.warning("text encoder graph differs from eager (rel. error %.3g); not used", err)
                    return None
            return graphed
        except Exception as exc:  # noqa: BLE001 - an uncapturable encoder still works eagerly
            log.warning("text encoder not captured (%s: %s); it runs eagerly", type(exc).__name__, exc)
            torch.cuda.synchronize(self.device)
            return None
