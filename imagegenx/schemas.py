"""The API <-> worker contract: one request model and one result schema.

Both sides import these models, so a request that passes validation in the API
is exactly what the worker runs, and the worker never sees invalid input.
Bump SCHEMA_VERSION whenever a field changes meaning.
"""
from __future__ import annotations

import ipaddress
from enum import Enum
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

SCHEMA_VERSION = 1
MAX_SEED = 2**32 - 1


class Sampler(str, Enum):
    """Samplers the engines implement (diffusers schedulers underneath)."""

    EULER = "euler"
    EULER_A = "euler_a"
    DDIM = "ddim"
    DPMPP_2M = "dpmpp_2m"


class WatermarkPosition(str, Enum):
    TOP_LEFT = "top-left"
    TOP_RIGHT = "top-right"
    BOTTOM_LEFT = "bottom-left"
    BOTTOM_RIGHT = "bottom-right"
    CENTER = "center"


class Watermark(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text: str = Field(min_length=1, max_length=64)
    position: WatermarkPosition = WatermarkPosition.BOTTOM_RIGHT
    opacity: float = Field(default=0.5, ge=0.0, le=1.0)


class Postprocess(BaseModel):
    model_config = ConfigDict(extra="forbid")

    thumbnail: int = Field(default=128, ge=16, le=512, description="longest side, px")
    watermark: Watermark | None = None


class Limits(BaseModel):
    """Server-side bounds, taken from settings and passed as validation context."""

    max_prompt_chars: int = 1000
    min_size: int = 64
    max_size: int = 1024
    max_steps: int = 100
    max_num_images: int = 4
    max_guidance: float = 30.0


def _limits(info: ValidationInfo) -> Limits:
    ctx = info.context or {}
    limits = ctx.get("limits")
    return limits if isinstance(limits, Limits) else Limits()


def check_callback_url(url: str) -> str:
    """Accept only absolute http(s) URLs; literal private/loopback IPs are refused.

    Host names are resolved and re-checked at delivery time (SSRF protection
    belongs where the connection is made).
    """
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise ValueError("must be an http or https URL")
    if not parts.hostname:
        raise ValueError("must name a host")
    try:
        addr = ipaddress.ip_address(parts.hostname)
    except ValueError:
        return url
    if not addr.is_global:
        raise ValueError("must not point at a private, loopback or link-local address")
    return url


class GenerateRequest(BaseModel):
    """What a user asks for. Bounds come from `Limits` in the validation context."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    prompt: str = Field(min_length=1)
    negative_prompt: str = ""
    width: int | None = Field(default=None, description="px, multiple of 8; default: model's native size")
    height: int | None = Field(default=None, description="px, multiple of 8; default: model's native size")
    steps: int = Field(default=20, ge=1)
    guidance_scale: float = Field(default=7.5, ge=0.0)
    sampler: Sampler = Sampler.EULER
    seed: Annotated[int, Field(ge=0, le=MAX_SEED)] | None = None
    num_images: int = Field(default=1, ge=1)
    postprocess: Postprocess = Field(default_factory=Postprocess)
    callback_url: str | None = Field(default=None, max_length=2048)
    timeout_s: float | None = Field(default=None, gt=0, le=86400)

    @field_validator("prompt", "negative_prompt")
    @classmethod
    def _prompt_length(cls, v: str, info: ValidationInfo) -> str:
        limit = _limits(info).max_prompt_chars
        if len(v) > limit:
            raise ValueError(f"at most {limit} characters")
        return v

    @field_validator("width", "height")
    @classmethod
    def _size(cls, v: int | None, info: ValidationInfo) -> int | None:
        if v is None:
            return v
        lim = _limits(info)
        if v % 8:
            raise ValueError("must be a multiple of 8")
        if not lim.min_size <= v <= lim.max_size:
            raise ValueError(f"must be between {lim.min_size} and {lim.max_size}")
        return v

    @field_validator("steps")
    @classmethod
    def _steps(cls, v: int, info: ValidationInfo) -> int:
        limit = _limits(info).max_steps
        if v > limit:
            raise ValueError(f"at most {limit}")
        return v

    @field_validator("guidance_scale")
    @classmethod
    def _guidance(cls, v: float, info: ValidationInfo) -> float:
        limit = _limits(info).max_guidance
        if v > limit:
            raise ValueError(f"at most {limit}")
        return v

    @field_validator("num_images")
    @classmethod
    def _num_images(cls, v: int, info: ValidationInfo) -> int:
        limit = _limits(info).max_num_images
        if v > limit:
            raise ValueError(f"at most {limit}")
        return v

    @field_validator("callback_url")
    @classmethod
    def _callback(cls, v: str | None) -> str | None:
        return None if v is None else check_callback_url(v)

    @model_validator(mode="after")
    def _seed_range(self) -> "GenerateRequest":
        if self.seed is not None and self.seed + self.num_images - 1 > MAX_SEED:
            raise ValueError(f"seed + num_images - 1 must not exceed {MAX_SEED}")
        return self

    def sample_seeds(self) -> list[int]:
        """Seeds of this request's images: seed, seed+1, ... (seed must be set)."""
        if self.seed is None:
            raise ValueError("seed is not set")
        return [self.seed + i for i in range(self.num_images)]


class ImageResult(BaseModel):
    url: str
    thumbnail_url: str
    seed: int
    width: int
    height: int


class BatchInfo(BaseModel):
    id: str
    size: int = Field(description="images in the batch this request ran in")
    requests: int = Field(description="requests in that batch")


class GenerateResult(BaseModel):
    """What a SUCCESS result holds, in the Celery backend and over REST."""

    schema_version: int = SCHEMA_VERSION
    images: list[ImageResult]
    batch: BatchInfo
    timings: dict[str, float]
    model: str
    sampler: Sampler
    steps: int


class Progress(BaseModel):
    step: int
    total: int


TaskState = Literal[
    "PENDING", "RECEIVED", "STARTED", "PROGRESS", "SUCCESS", "FAILURE", "REVOKED", "RETRY"
]


class SubmitResponse(BaseModel):
    task_id: str
    status_url: str
    seed: int


class FieldError(BaseModel):
    field: str
    reason: str


class ErrorResponse(BaseModel):
    error: str
    fields: list[FieldError] | None = None


class TaskError(BaseModel):
    type: str
    message: str


class TaskStatus(BaseModel):
    task_id: str
    state: TaskState
    progress: Progress | None = None
    result: GenerateResult | None = None
    error: TaskError | None = None
