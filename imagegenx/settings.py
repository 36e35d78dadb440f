"""Service settings: code defaults < YAML file < IMAGEGENX_* environment variables.

One object configures the API, the worker and the CLI, so the two sides of the
queue never disagree about broker, queue name or request bounds.
"""
from __future__ import annotations

import hashlib
import ipaddress
import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)
from typing_extensions import Annotated

from imagegenx.batching import prefetch_window
from imagegenx.guidance import check_interval, parse_interval
from imagegenx.models import ModelSpec, model_queue, parse_models
from imagegenx.schemas import Limits
from imagegenx.shapes.model_files import SHAPES_MODEL_SETTING

CONFIG_ENV = "IMAGEGENX_CONFIG"
_LIMITS = Limits()
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_HOSTNAME = re.compile(r"(?=.{1,253}$)([a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9])?)(\.[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9])?)*")


def _yaml_path() -> Path | None:
    path = os.environ.get(CONFIG_ENV)
    return Path(path) if path else None


def _celery_version() -> tuple[int, ...]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        text = version("celery")
    except PackageNotFoundError:
        return (0,)
    return tuple(int(p) for p in text.split(".")[:2] if p.isdigit())


def hash_api_key(key: str) -> str:
    """API keys are kept as sha256 hex digests; plain keys never leave the request."""
    return hashlib.sha256(key.encode()).hexdigest()


# How results' PNGs are deflated (imagegenx.postprocess.PNG_OPTIONS holds each one's encoder options).
PngCompression = Literal["fast", "small"]


class Settings(BaseSettings):
    """Every knob of the service. See the README's configuration table."""

    model_config = SettingsConfigDict(env_prefix="IMAGEGENX_", extra="ignore")

    # Queue
    broker_url: str = "redis://127.0.0.1:6379/0"
    result_backend: str = "redis://127.0.0.1:6379/0"
    queue: str = "imagegenx"
    sentinel_master: str = Field(
        default="", description="Redis Sentinel master name, for sentinel:// broker/backend URLs",
    )
    result_expires_s: int = 86400
    result_cache: bool = Field(
        default=True,
        description="a request with a seed and no \"cache\" field is answered from the stored images of "
                    "an identical earlier request of the same API key (within result_expires_s)",
    )
    visibility_timeout_s: int = 3600

    # Batching
    max_batch: int = Field(default=8, ge=1, le=256)
    max_wait_ms: float = Field(default=50.0, ge=0.0, le=60_000.0)
    prefetch_batches: int = Field(default=2, ge=2, description="full batches a worker may hold")
    expected_batch_s: float = Field(default=60.0, gt=0, description="worst-case time of one batch")
    scheduler: Literal["step", "request"] = Field(
        default="step",
        description="step: requests join and leave the running rows at every denoising step; "
                    "request: whole requests are batched and run all their steps together",
    )
    priority_age_s: float = Field(
        default=10.0, gt=0, le=3600,
        description="step scheduler: a waiting request gains one priority level per this many seconds",
    )
    step_order: Literal["fifo", "shortest"] = Field(
        default="fifo",
        description="step scheduler: among waiting requests of equal priority and fair share, "
                    "the least work (steps x images) first, or arrival order",
    )
    step_min_gain: float = Field(
        default=0.05, ge=0.0, le=10.0,
        description="step scheduler: a request joins the running rows only if the call's padded "
                    "bucket has room, images/s rise by this share, or a queue is forming",
    )
    admit_delay_ms: float = Field(
        default=0.0, ge=0.0, le=60_000.0,
        description="step scheduler: how long an idle worker holds its first request to gather others",
    )
    max_deliveries: int = Field(
        default=3, ge=1,
        description="deliveries whose run was lost with its worker before a request ends FAILURE",
    )

    # Engine
    engine: Literal["diffusion", "synthetic"] = "diffusion"
    model: Path = Field(
        default=SHAPES_MODEL_SETTING,
        description="diffusers model folder or single-file checkpoint; default: the shipped shapes model "
                    "(a relative imagegenx/... path missing from the working directory is taken from the package)",
    )
    # Not "model_config": pydantic reserves that name.
    model_config_dir: Path = Field(
        default=Path("configs/sd15"),
        description="component configs for a single-file .safetensors model; a relative path missing "
                    "from the working directory is taken from the repository root",
    )
    model_name: str = ""
    model_version: str = Field(
        default="", description="names the weights in results (model_version); empty: derived from "
                                "the model files' names, sizes and times",
    )
    # Several models behind one API: name -> {path, engine, version, lora_dir}. Unset: the
    # one model above (engine, model, model_name) on the queue itself, as before.
    models: Annotated[dict[str, ModelSpec], NoDecode] = Field(
        default_factory=dict,
        description="served models, 'name=path,name2=path2' or a JSON object "
                    '{"name": {"path": .., "engine": .., "version": ..}}; the first is the default; '
                    "each has its own queue <queue>.<name>",
    )
    worker_model: str = Field(default="", description="the served model a worker runs (default: the first)")
    max_queue_without_worker: int = Field(
        default=100, ge=0,
        description="requests a model with no live worker may have waiting; more get 503",
    )
    lora_dir: Path = Field(
        default=Path("var/loras"),
        description="one subfolder per named LoRA (name = folder name) holding its .safetensors file",
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "fp32", "fp16", "bf16"] = "auto"
    synthetic_cost: Literal["zero", "sd15-h200", "sd15-h200-graphs"] = "zero"
    # Testing aid: faults the synthetic engine injects (see imagegenx.engine.synthetic).
    synthetic_faults: str = Field(default="", description="e.g. raise:MARKER,oom:4,exit:MARKER,device:MARKER")
    progress_interval_s: float = Field(default=0.5, ge=0.0)
    # GPU fast path (CUDA only; ignored on the CPU). Prepared at worker start.
    compile: bool = Field(default=True, description="torch.compile the UNet and the VAE decode")
    cuda_graphs: bool = Field(default=True, description="one CUDA graph per batch-size bucket")
    decode_stream: bool = Field(
        default=True, description="step scheduler: VAE decodes on a CUDA stream of their own, "
                                  "overlapped with the next UNet calls",
    )
    batch_buckets: Annotated[list[int], NoDecode] = Field(
        default_factory=lambda: [1, 2, 4, 8, 16, 32],
        description="batch sizes (images) the UNet is captured at; a batch runs padded to the next one",
    )
    # Compiled artifact from `imagegenx optimize warmup`, loaded before the fast path compiles.
    compile_cache: str = Field(
        default="", description="folder or s3://bucket/prefix of a compiled artifact (optimize warmup); "
                                "a mismatched one is refused with a one-line reason and the worker compiles",
    )
    # UNet backend: PyTorch, or a TensorRT engine built by `imagegenx optimize build` (CUDA only).
    unet_backend: Literal["torch", "trt"] = Field(
        default="torch", description="torch, or trt: the UNet runs as the TensorRT engine trt_engine",
    )
    trt_engine: str = Field(default="", description="TensorRT engine file of the UNet (unet_backend trt)")
    upscaler_model: str = Field(
        default="", description="super-resolution weights (.pth, .safetensors) for postprocess.upscale, "
                                "run on the engine's device (extra 'upscale'); empty: Lanczos",
    )
    png_compression: PngCompression = Field(
        default="fast",
        description="results' PNG deflate: fast (filtered rows, run-length matches only) or small "
                    "(zlib level 6: up to 6% smaller files, up to 4x the encoding time)",
    )

    # Storage and API
    data_dir: Path = Field(default=Path("var"),
                           description="state of `imagegenx up` (generated API key and Flower password)")
    storage_root: Path = Path("var/images")
    public_url: str = Field(default="", description="base of image URLs; default http://api_host:api_port")
    api_host: str = "127.0.0.1"
    api_port: int = 8000
    flower_port: int = 5555
    # Plain keys are secrets: hidden from repr and dumps, hashed when used.
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(default_factory=list)
    api_key_hashes: Annotated[list[str], NoDecode] = Field(default_factory=list)
    max_body_bytes: int = 16 * 1024

    # Image storage: files under storage_root, or an S3-compatible bucket whose
    # presigned URLs go into results (credentials: the usual AWS_* variables).
    storage_backend: Literal["local", "s3"] = "local"
    s3_bucket: str = ""
    s3_prefix: str = Field(default="", description="prepended to every object key, e.g. images/")
    s3_endpoint_url: str = Field(default="", description="S3-compatible endpoint; empty for AWS")
    s3_region: str = Field(default="", description="empty: the AWS_REGION / AWS_DEFAULT_REGION chain")
    s3_addressing_style: Literal["auto", "path", "virtual"] = "auto"
    s3_presign_expires_s: int = Field(default=86400, ge=1, le=604800,
                                      description="lifetime of presigned image URLs (SigV4: 7 days at most)")

    # Monitoring
    worker_metrics_port: int = Field(
        default=9450, ge=0, le=65535,
        description="Prometheus port of a worker (0: no metrics server); `imagegenx worker` adds the GPU index",
    )
    worker_metrics_host: str = Field(default="127.0.0.1", description="address the worker's metrics server binds")
    workers_inspect_timeout_s: float = Field(
        default=1.0, gt=0, le=30, description="how long GET /api/v1/workers waits for worker replies"
    )

    # Server-sent events (GET /api/v1/tasks/<id>/events)
    events_heartbeat_s: float = Field(
        default=15.0, gt=0, le=300,
        description="an event stream sends a comment line after this long without an event",
    )
    events_poll_s: float = Field(
        default=2.0, gt=0, le=30,
        description="an event stream waits this long for an event before it looks at the task's "
                    "state and queue position",
    )
    events_max_stream_s: float = Field(
        default=600.0, gt=0, le=86400,
        description="an event stream closes after this long; the client reconnects with Last-Event-ID",
    )

    # Overload and abuse protection (API)
    max_queue_depth: int = Field(
        default=1000, ge=0,
        description="messages waiting in the queue above which submissions get 503 (0: no limit)",
    )
    retry_after_s: int = Field(default=5, ge=1, description="Retry-After of 503 answers")
    rate_limit: str = Field(
        default="60/minute",
        description="submissions per API key, e.g. '60/minute' or '10/second;500/hour' ('' : off)",
    )
    status_rate_limit: str = Field(
        default="1200/minute", description="task reads and revokes per API key ('' : off)",
    )
    workers_rate_limit: str = Field(
        default="60/minute", description="GET /api/v1/workers per API key: each asks every worker ('' : off)",
    )
    health_rate_limit: str = Field(
        default="600/minute", description="GET /healthz per client address, generous for load balancers ('' : off)",
    )
    # Cost of requests (imagegenx.cost): units = 512x512 UNet rows x steps
    max_request_cost: int = Field(
        default=1600, ge=0, description="largest cost of one request, in cost units (0: no limit)",
    )
    cost_budget_per_minute: int = Field(
        default=9600, ge=0,
        description="cost units an API key may submit in any 60 s (moving window in Redis; 0: off)",
    )
    cost_native_size: int = Field(
        default=0, ge=0, description="side (px) an unset width or height is charged as (0: max_size)",
    )
    # Fair share between API keys
    max_unfinished_per_key: int = Field(
        default=0, ge=0,
        description="most unfinished (queued or running) tasks per API key; 429 above it (0: no limit)",
    )
    key_max_priority: Annotated[dict[str, int], NoDecode] = Field(
        default_factory=dict,
        description="highest request priority per API key digest, 'digest:5,digest2:10' "
                    "(keys not listed: max_priority)",
    )
    ready_max_drain_s: float = Field(
        default=0.0, ge=0,
        description="/healthz?ready answers 503 when the queue's estimated drain time passes "
                    "this (0: never)",
    )

    # Webhooks (callback_url)
    webhook_secret: SecretStr = Field(
        default=SecretStr(""),
        description="HMAC-SHA256 key signing webhook bodies; callback_url is refused while unset",
    )
    webhook_allow_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="host names or CIDRs a webhook may reach although not public (e.g. 10.0.0.0/8)",
    )
    webhook_queue: str = Field(default="", description="queue of webhook deliveries; default <queue>.webhooks")
    webhook_max_attempts: int = Field(default=5, ge=1, le=50)
    webhook_backoff_s: float = Field(default=2.0, gt=0, description="delay before the first retry; doubles")
    webhook_backoff_max_s: float = Field(default=300.0, gt=0, description="longest delay between attempts")
    webhook_timeout_s: float = Field(default=5.0, gt=0, le=60,
                                     description="longest one attempt may take (connect and answer)")

    # Request bounds (passed to request validation as `limits`; their defaults live there)
    max_prompt_chars: int = _LIMITS.max_prompt_chars
    min_size: int = _LIMITS.min_size
    max_size: int = _LIMITS.max_size
    max_steps: int = _LIMITS.max_steps
    max_num_images: int = _LIMITS.max_num_images
    max_priority: int = Field(default=_LIMITS.max_priority, ge=0, le=1000,
                              description="highest request priority")
    max_guidance: float = _LIMITS.max_guidance
    guidance_interval: Annotated[tuple[float, float], NoDecode] = Field(
        default=_LIMITS.guidance_interval,
        description="start,end: fractions of the trajectory guided when a request names no "
                    "guidance_interval (0,1: every step)")
    max_upscaled_side: int = Field(default=_LIMITS.max_upscaled_side, ge=64,
                                   description="longest side of an upscaled image, px")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        path = _yaml_path()
        if path is not None:
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=path))
        return tuple(sources)

    @field_validator("api_keys", "api_key_hashes", "webhook_allow_hosts", mode="before")
    @classmethod
    def _split_csv(cls, v: Any) -> Any:
        if isinstance(v, str):
            return [part.strip() for part in v.split(",") if part.strip()]
        return v

    @field_validator("models", mode="before")
    @classmethod
    def _parse_models(cls, v: Any) -> Any:
        return parse_models(v)

    @field_validator("key_max_priority", mode="before")
    @classmethod
    def _split_priorities(cls, v: Any) -> Any:
        if not isinstance(v, str):
            return v
        out: dict[str, str] = {}
        for part in (p.strip() for p in v.split(",")):
            if part:
                digest, sep, value = part.rpartition(":")
                if not sep:
                    raise ValueError(f"key_max_priority: {part!r} is not 'digest:priority'")
                out[digest.strip()] = value.strip()
        return out

    @field_validator("key_max_priority")
    @classmethod
    def _check_priorities(cls, v: dict[str, int]) -> dict[str, int]:
        for digest, cap in v.items():
            if not _SHA256_HEX.fullmatch(digest):
                raise ValueError(f"key_max_priority: {digest!r} is not a sha256 hex digest of "
                                 "an API key (64 lower-case hex characters)")
            if cap < 0:
                raise ValueError(f"key_max_priority: {cap} is below 0")
        return v

    @field_validator("api_key_hashes")
    @classmethod
    def _check_hashes(cls, v: list[str]) -> list[str]:
        out = [h.lower() for h in v]
        for h in out:
            if not _SHA256_HEX.fullmatch(h):
                raise ValueError("api_key_hashes must be sha256 hex digests (64 hex characters)")
        return out

    @field_validator("rate_limit", "status_rate_limit", "workers_rate_limit", "health_rate_limit")
    @classmethod
    def _check_rate(cls, v: str) -> str:
        v = v.strip()
        if v:
            from limits import parse_many

            try:
                parse_many(v)
            except ValueError:
                raise ValueError(f"{v!r} is not a rate limit such as '60/minute' or "
                                 "'10/second;500/hour'") from None
        return v

    @field_validator("webhook_allow_hosts")
    @classmethod
    def _check_allow_hosts(cls, v: list[str]) -> list[str]:
        out = []
        for entry in v:
            entry = entry.strip().lower().rstrip(".")
            if "/" in entry or entry.replace(".", "").isdigit() or ":" in entry:
                try:
                    ipaddress.ip_network(entry, strict=False)
                except ValueError:
                    raise ValueError(f"webhook_allow_hosts: {entry!r} is not an address or CIDR") from None
            elif not _HOSTNAME.fullmatch(entry):
                raise ValueError(f"webhook_allow_hosts: {entry!r} is not a host name, address or CIDR")
            out.append(entry)
        return out

    @field_validator("guidance_interval", mode="before")
    @classmethod
    def _parse_interval(cls, v: Any) -> Any:
        if isinstance(v, str):
            return parse_interval(v)
        if isinstance(v, (list, tuple)) and len(v) == 2:
            return check_interval((v[0], v[1]))
        return v

    @field_validator("batch_buckets", mode="before")
    @classmethod
    def _split_buckets(cls, v: Any) -> Any:
        if isinstance(v, str):
            return [int(part) for part in v.replace(" ", "").split(",") if part]
        return v

    @field_validator("batch_buckets")
    @classmethod
    def _check_buckets(cls, v: list[int]) -> list[int]:
        if not v or any(b < 1 for b in v) or v != sorted(set(v)):
            raise ValueError("batch_buckets must be distinct positive batch sizes in ascending order")
        return v

    @field_validator("compile_cache")
    @classmethod
    def _check_compile_cache(cls, v: str) -> str:
        v = v.strip()
        if v.startswith("s3://") and not v.removeprefix("s3://").split("/", 1)[0]:
            raise ValueError("compile_cache: an s3:// location needs a bucket, e.g. s3://bucket/prefix")
        if "://" in v and not v.startswith("s3://"):
            raise ValueError("compile_cache: a local folder or an s3://bucket/prefix location")
        return v

    @field_validator("synthetic_faults")
    @classmethod
    def _check_faults(cls, v: str) -> str:
        if v.strip():
            from imagegenx.engine.synthetic import parse_faults

            parse_faults(v)  # raises ValueError naming the bad entry
        return v

    @model_validator(mode="after")
    def _check(self) -> "Settings":
        uses_sentinel = any(url.startswith("sentinel://")
                            for url in (self.broker_url, self.result_backend))
        if uses_sentinel and not self.sentinel_master:
            raise ValueError("sentinel:// URLs need sentinel_master (the master's name)")
        if self.max_num_images > self.max_batch:
            raise ValueError("max_num_images must not exceed max_batch")
        for name, spec in self.models.items():
            if (spec.engine or self.engine) == "diffusion" and spec.path is None:
                raise ValueError(f"models: {name!r} runs the diffusion engine and needs a path")
            if model_queue(self.queue, name) == self.webhook_queue_name:
                raise ValueError(f"models: {name!r} would share the webhook queue's name")
        if self.worker_model and self.worker_model not in self.served_models:
            raise ValueError(f"worker_model {self.worker_model!r} is not served; served models: "
                             f"{', '.join(self.served_models)}")
        if self.min_size > self.max_size:
            raise ValueError("min_size must not exceed max_size")
        if self.unet_backend == "trt" and not self.trt_engine:
            raise ValueError("unet_backend trt needs trt_engine (IMAGEGENX_TRT_ENGINE), "
                             "an engine file from `imagegenx optimize build`")
        if self.storage_backend == "s3" and not self.s3_bucket:
            raise ValueError("storage_backend s3 needs s3_bucket (IMAGEGENX_S3_BUCKET)")
        if self.result_backend.startswith("db+") and _celery_version() < (5, 7):
            # Before 5.7 the database backend let a late write replace a SUCCESS.
            raise ValueError("a database result backend (db+...) needs celery 5.7 or newer, "
                             "which never overwrites a SUCCESS")
        if 0 < self.cost_budget_per_minute < self.max_request_cost:
            raise ValueError("max_request_cost must not exceed cost_budget_per_minute: "
                             "requests between the two could never be accepted")
        if self.webhook_backoff_max_s >= self.visibility_timeout_s:
            raise ValueError(
                "webhook_backoff_max_s must be shorter than visibility_timeout_s: a delayed "
                "retry held longer than the visibility timeout is delivered twice"
            )
        if self.visibility_timeout_s <= self.worst_wait_s:
            raise ValueError(
                f"visibility_timeout_s ({self.visibility_timeout_s}) must exceed the longest "
                f"time a message can stay unacknowledged ({self.worst_wait_s:.0f} s: "
                "max_wait + expected_batch_s per max_batch of the prefetch window); otherwise tasks run twice"
            )
        return self

    @property
    def max_wait_s(self) -> float:
        return self.max_wait_ms / 1000.0

    @property
    def prefetch(self) -> int:
        """Unacknowledged messages one worker may hold (buffered + running).

        The step scheduler runs up to 2 x max_batch images at once when they are
        outside their guidance interval (one UNet row each): one more max_batch of
        messages keeps that from eating the buffered ones."""
        extra = self.max_batch if self.scheduler == "step" else 0
        return prefetch_window(self.max_batch, self.prefetch_batches) + extra

    @property
    def worst_wait_s(self) -> float:
        """Longest a message may stay unacknowledged: its wait to be drained, then a
        batch's time for each max_batch of the messages a worker holds (one more
        under the step scheduler, whose window is one max_batch larger)."""
        held_batches = -(-self.prefetch // self.max_batch)
        return self.max_wait_s + held_batches * self.expected_batch_s

    @property
    def limits(self) -> Limits:
        return Limits(
            max_prompt_chars=self.max_prompt_chars,
            min_size=self.min_size,
            max_size=self.max_size,
            max_steps=self.max_steps,
            max_num_images=self.max_num_images,
            max_priority=self.max_priority,
            max_guidance=self.max_guidance,
            guidance_interval=self.guidance_interval,
            max_upscaled_side=self.max_upscaled_side,
            callback_allow_hosts=tuple(self.webhook_allow_hosts),
        )

    @property
    def cost_unset_side(self) -> int:
        """Side (px) the cost model charges for an unset width or height."""
        return self.cost_native_size or self.max_size

    @property
    def public_base(self) -> str:
        return (self.public_url or f"http://{self.api_host}:{self.api_port}").rstrip("/")

    @property
    def served_model_name(self) -> str:
        return self.model_name or (self.model.stem if self.model.suffix.lower() == ".safetensors" else self.model.name)

    @property
    def served_models(self) -> dict[str, ModelSpec]:
        """Served models by name, the default first."""
        if self.models:
            return dict(self.models)
        return {self.served_model_name: ModelSpec(path=self.model, engine=self.engine,
                                                  version=self.model_version)}

    @property
    def default_model(self) -> str:
        return next(iter(self.served_models))

    def queue_for(self, model: str) -> str:
        """The queue of ``model``'s requests: <queue>.<model>, or the queue itself when
        IMAGEGENX_MODELS is unset (one model, as before)."""
        return model_queue(self.queue, model) if self.models else self.queue

    @property
    def generation_queues(self) -> dict[str, str]:
        """Queue of each served model, by model name."""
        return {name: self.queue_for(name) for name in self.served_models}

    def for_model(self, name: str = "") -> "Settings":
        """These settings with one served model's engine, weights, name and version in
        place of the single-model ones: what a worker for that model runs with."""
        name = name or self.worker_model or self.default_model
        spec = self.served_models[name]
        return self.model_copy(update={
            "engine": spec.engine or self.engine,
            "model": spec.path if spec.path is not None else self.model,
            "model_name": name,
            "model_version": spec.version,
            "lora_dir": spec.lora_dir or self.lora_dir,
            "worker_model": name,
        })

    @property
    def webhook_queue_name(self) -> str:
        return self.webhook_queue or f"{self.queue}.webhooks"

    def priority_cap(self, digest: str) -> int:
        """Highest priority this API key may ask for."""
        return min(self.key_max_priority.get(digest, self.max_priority), self.max_priority)

    def key_digests(self) -> frozenset[str]:
        """All accepted key digests: hashed plain keys plus pre-hashed ones."""
        return frozenset([hash_api_key(k.get_secret_value()) for k in self.api_keys]
                         + list(self.api_key_hashes))


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
