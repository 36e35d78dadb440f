"""The API <-> worker contract: one request model and one result schema.

Both sides import these models, so a request that passes validation in the API
is exactly what the worker runs, and the worker never sees invalid input.
Bump SCHEMA_VERSION whenever a field changes meaning.
"""
from __future__ import annotations

import re
from enum import Enum
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails, PydanticCustomError

from imagegenx import guidance
from imagegenx.webhook_events import CallbackEvent

SCHEMA_VERSION = 1
MAX_SEED = 2**32 - 1
CALLBACK_URL_MAX = 2048
MAX_LORAS = 4
# A preview every K steps: K at most this (the longest run a server allows is max_steps).
MAX_PREVIEW_EVERY = 1000
LORA_WEIGHT_MAX = 2.0  # |lora_weight| at most this
# A LoRA name is a folder name in lora_dir: no path separators, no leading dot.
LORA_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
LORA_NAME = re.compile(LORA_NAME_PATTERN)


# Message header naming the submitting API key (a digest prefix, never the key):
# the step scheduler shares rows fairly between tenants.
TENANT_HEADER = "imagegenx_tenant"


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


def _json_number(v: object) -> object:
    """Only a JSON number is a number: pydantic's lax mode would read true/false as 1/0
    and parse text such as "128"."""
    if isinstance(v, bool):
        raise ValueError("must be a number, not true or false")
    if isinstance(v, str):
        raise ValueError("must be a number, not a string")
    return v


# Reasons in one style ("must be at most 4"), whichever check failed: pydantic's own
# messages ("Input should be greater than or equal to 1") are replaced by error type.
_REASONS = {
    "greater_than_equal": "must be at least {ge}",
    "less_than_equal": "must be at most {le}",
    "greater_than": "must be greater than {gt}",
    "less_than": "must be less than {lt}",
    "string_too_short": "must have at least {min_length} character{s}",
    "string_too_long": "must have at most {max_length} character{s}",
    "too_short": "must have at least {min_length} item{s}",
    "too_long": "must have at most {max_length} item{s}",
    "int_type": "must be an integer",
    "int_parsing": "must be an integer",
    "int_from_float": "must be an integer",
    "float_type": "must be a number",
    "float_parsing": "must be a number",
    "literal_error": "must be {expected}",
    "enum": "must be {expected}",
    "bool_type": "must be true or false",
}


def _plain(v: object) -> object:
    """4.0 reads as 4 in a reason."""
    return int(v) if isinstance(v, float) and v.is_integer() else v


def error_reason(err: ErrorDetails) -> str:
    """The reason to show for one pydantic error, in the project's wording."""
    template = _REASONS.get(err["type"])
    if template is None:
        msg = err["msg"]
        return msg[len("Value error, "):] if msg.startswith("Value error, ") else msg
    ctx = {k: _plain(v) for k, v in (err.get("ctx") or {}).items()}
    count = ctx.get("min_length", ctx.get("max_length"))
    return template.format(**ctx, s="" if count == 1 else "s")


class Watermark(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text: str = Field(min_length=1, max_length=64)
    position: WatermarkPosition = WatermarkPosition.BOTTOM_RIGHT
    opacity: float = Field(default=0.5, ge=0.0, le=1.0)

    _numbers = field_validator("opacity", mode="before")(_json_number)


class Postprocess(BaseModel):
    model_config = ConfigDict(extra="forbid")

    thumbnail: int = Field(default=128, ge=16, le=512, description="longest side, px")
    upscale: Literal[1, 2, 4] = Field(
        default=1, description="enlarge the image this many times (1: as drawn); "
                               "the result's sides are bounded by the server's max_upscaled_side",
    )

    _numbers = field_validator("thumbnail", "upscale", mode="before")(_json_number)
    watermark: Watermark | None = None


class PreviewRequest(BaseModel):
    """Ask for a small preview image of the running latents every ``every`` steps."""

    model_config = ConfigDict(extra="forbid")

    every: int = Field(ge=1, le=MAX_PREVIEW_EVERY, description="a preview after every this many steps")

    _numbers = field_validator("every", mode="before")(_json_number)


class Limits(BaseModel):
    """Server-side bounds, taken from settings and passed as validation context."""

    max_prompt_chars: int = 1000
    min_size: int = 64
    max_size: int = 1024
    max_steps: int = 100
    max_num_images: int = 4
    max_guidance: float = 30.0
    max_upscaled_side: int = 4096
    max_priority: int = 10
    # Fractions of the trajectory guided when a request names no guidance_interval.
    guidance_interval: tuple[float, float] = (0.0, 0.4)
    # Host names and CIDRs a callback_url may point at although not public.
    callback_allow_hosts: tuple[str, ...] = ()


def _limits(info: ValidationInfo) -> Limits:
    ctx = info.context or {}
    limits = ctx.get("limits")
    return limits if isinstance(limits, Limits) else Limits()


LoraName = Annotated[str, Field(pattern=LORA_NAME_PATTERN)]
LoraWeight = Annotated[float, Field(ge=-LORA_WEIGHT_MAX, le=LORA_WEIGHT_MAX)]


def _lora_weight_rules(schema: dict[str, Any]) -> None:
    """Publish the rule a property schema cannot state: a list of weights is as long as lora."""
    def exactly(n: int) -> dict[str, Any]:
        return {"type": "array", "minItems": n, "maxItems": n}

    schema["anyOf"] = [
        {"properties": {"lora_weight": {"type": "number"}}},
        {"properties": {"lora": {"type": "null"}, "lora_weight": exactly(0)}},
        {"properties": {"lora": {"type": "string"}, "lora_weight": exactly(1)}, "required": ["lora"]},
        *({"properties": {"lora": exactly(n), "lora_weight": exactly(n)}, "required": ["lora"]}
          for n in range(MAX_LORAS + 1)),
    ]


def check_callback_url(url: str, allow_hosts: tuple[str, ...] = ()) -> str:
    """Accept only absolute http(s) URLs; literal private/loopback IPs are refused
    unless allow-listed.

    Host names are resolved and re-checked at delivery time (SSRF protection
    belongs where the connection is made: ``imagegenx.webhooks.vet``).
    """
    from imagegenx.webhooks import AllowList, WebhookRefused, check_url

    try:
        return check_url(url, AllowList.parse(allow_hosts))
    except WebhookRefused as exc:
        raise ValueError(str(exc)) from None


# Request fields bounded above by a server limit: field -> Limits attribute.
_UPPER_LIMITS = {"steps": "max_steps", "guidance_scale": "max_guidance",
                 "num_images": "max_num_images", "priority": "max_priority"}


class GenerateRequest(BaseModel):
    """What a user asks for. Bounds come from `Limits` in the validation context."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True,
                              json_schema_extra=_lora_weight_rules)

    prompt: str = Field(min_length=1)
    negative_prompt: str = ""
    width: int | None = Field(default=None, description="px, multiple of 8; default: model's native size")
    height: int | None = Field(default=None, description="px, multiple of 8; default: model's native size")
    steps: int = Field(default=20, ge=1)
    guidance_scale: float = Field(default=7.5, ge=0.0)
    guidance_interval: tuple[float, float] | None = Field(
        default=None, description="[start, end], fractions of the trajectory (0 <= start < end <= 1) "
        "whose steps run classifier-free guidance; the other steps, and every step at a "
        "guidance_scale of at most 1, run the conditional UNet row only (about half the cost); "
        "default: the server's guidance_interval")
    sampler: Sampler = Sampler.EULER
    seed: Annotated[int, Field(ge=0, le=MAX_SEED)] | None = None
    num_images: int = Field(default=1, ge=1)
    postprocess: Postprocess = Field(default_factory=Postprocess)
    callback_url: str | None = Field(default=None, max_length=CALLBACK_URL_MAX)
    callback_events: Annotated[list[CallbackEvent], Field(
        min_length=1, max_length=3, json_schema_extra={"uniqueItems": True})] = Field(
        default_factory=lambda: ["completed"],
        description="which events callback_url receives: started, progress (at most one every "
                    "500 ms), completed")
    timeout_s: float | None = Field(default=None, gt=0, le=86400)
    priority: int = Field(default=0, ge=0, description="admission order on the worker: higher first; "
                          "a waiting request gains one level per priority_age_s")
    lora: LoraName | Annotated[list[LoraName], Field(max_length=MAX_LORAS,
                                                     json_schema_extra={"uniqueItems": True})] | None = Field(
        default=None, description=f"a LoRA name from the server's lora_dir, or a list of up to {MAX_LORAS}")
    # Any other text is checked against the served names (a 422 that lists them).
    model: str | None = Field(default=None, min_length=1, max_length=64,
                              description="a served model's name (GET /api/v1/models); default: the first")
    lora_weight: LoraWeight | Annotated[list[LoraWeight], Field(max_length=MAX_LORAS)] = Field(
        default=1.0, description="LoRA strength: one number for all, or a list matching lora; 0 leaves one out")
    preview: PreviewRequest | None = Field(
        default=None, description="small preview images of the running latents in the task's progress "
                                  "(step scheduler only)")
    cache: bool | None = Field(
        default=None, strict=True, description="with a seed: answer from the stored images of an identical earlier "
                                  "request of the same API key; default: the server's result_cache")

    _numbers = field_validator("width", "height", "steps", "guidance_scale", "seed", "num_images",
                               "timeout_s", "priority", mode="before")(_json_number)

    # Lengths are checked on the text as sent, before surrounding whitespace is
    # stripped, as the published schema (maxLength) says.
    @field_validator("prompt", "negative_prompt", mode="before")
    @classmethod
    def _prompt_length(cls, v: object, info: ValidationInfo) -> object:
        limit = _limits(info).max_prompt_chars
        if isinstance(v, str) and len(v) > limit:
            raise ValueError(f"must have at most {limit} characters")
        return v

    @field_validator("guidance_interval", mode="before")
    @classmethod
    def _guidance_interval(cls, v: object) -> object:
        """Two JSON numbers, 0 <= start < end <= 1; each reason names what is wrong."""
        if v is None:
            return v
        if not isinstance(v, (list, tuple)) or len(v) != 2:
            raise ValueError("must be a list of two numbers [start, end]")
        for x in v:
            _json_number(x)
            if not isinstance(x, (int, float)):
                raise ValueError("must be a list of two numbers [start, end]")
        return guidance.check_interval((v[0], v[1]))

    @field_validator("callback_url", mode="before")
    @classmethod
    def _callback_length(cls, v: object) -> object:
        if isinstance(v, str) and len(v) > CALLBACK_URL_MAX:
            raise ValueError(f"must have at most {CALLBACK_URL_MAX} characters")
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

    @field_validator("steps", "guidance_scale", "num_images", "priority")
    @classmethod
    def _at_most(cls, v: float, info: ValidationInfo) -> float:
        limit = getattr(_limits(info), _UPPER_LIMITS[str(info.field_name)])
        if v > limit:
            raise ValueError(f"must be at most {limit}")
        return v

    @field_validator("callback_url")
    @classmethod
    def _callback(cls, v: str | None, info: ValidationInfo) -> str | None:
        return None if v is None else check_callback_url(v, _limits(info).callback_allow_hosts)

    @field_validator("postprocess")
    @classmethod
    def _upscaled_size(cls, v: Postprocess, info: ValidationInfo) -> Postprocess:
        """Bound the upscaled image, whose memory grows with the factor squared.

        An unset width or height (the model's native size, unknown here) counts
        as max_size, so nothing accepted here can exceed the bound in the worker.
        """
        if v.upscale == 1 or not {"width", "height"} <= info.data.keys():
            return v  # nothing to bound, or a bad size already reported
        lim = _limits(info)
        w, h = (info.data[k] or lim.max_size for k in ("width", "height"))
        if max(w, h) * v.upscale <= lim.max_upscaled_side:
            return v
        unset = (" (an unset width or height counts as max_size, "
                 f"{lim.max_size})") if None in (info.data["width"], info.data["height"]) else ""
        reason = (f"x{v.upscale} of {w}x{h} gives {w * v.upscale}x{h * v.upscale}; the largest "
                  f"side allowed is {lim.max_upscaled_side}{unset}")
        raise ValidationError.from_exception_data("Postprocess", [{
            "type": PydanticCustomError("upscaled_size", reason), "loc": ("upscale",),
            "input": v.upscale}])

    @model_validator(mode="after")
    def _default_interval(self, info: ValidationInfo) -> "GenerateRequest":
        """An unset guidance_interval takes the server's (so the result says which ran)."""
        if self.guidance_interval is None and info.context:
            self.guidance_interval = _limits(info).guidance_interval
        return self

    def resolved_interval(self) -> tuple[float, float]:
        """The guidance interval this request runs with (the full trajectory if unset)."""
        return self.guidance_interval or guidance.FULL

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

    # LoRA fields are checked before type coercion, so that every reason names
    # the field itself (not a branch of its union type) and says what is wrong.
    @field_validator("lora", mode="before")
    @classmethod
    def _lora(cls, v: object) -> object:
        if v is None:
            return v
        names = [v] if isinstance(v, str) else v
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ValueError("must be a LoRA name or a list of names")
        if len(names) > MAX_LORAS:
            raise ValueError(f"must name at most {MAX_LORAS} LoRAs")
        for name in names:
            if not LORA_NAME.fullmatch(name):
                raise ValueError(f"{name!r} is not a LoRA name: 1 to 64 of A-Z a-z 0-9 . _ -, "
                                 "starting with a letter or digit")
        if len(set(names)) < len(names):
            raise ValueError("a LoRA is named twice")
        return v

    @field_validator("callback_events")
    @classmethod
    def _events_once(cls, v: list[str]) -> list[str]:
        if len(set(v)) < len(v):
            raise ValueError("an event is named twice")
        return v

    @field_validator("lora_weight", mode="before")
    @classmethod
    def _lora_weight(cls, v: object, info: ValidationInfo) -> object:
        for w in v if isinstance(v, list) else [v]:
            if isinstance(w, bool) or not isinstance(w, (int, float)):
                raise ValueError("must be a number or a list of numbers")
            if not -LORA_WEIGHT_MAX <= w <= LORA_WEIGHT_MAX:
                raise ValueError(f"must be between {-LORA_WEIGHT_MAX:g} and {LORA_WEIGHT_MAX:g}")
        if isinstance(v, list) and "lora" in info.data:  # absent: lora itself was invalid
            count = len(cls._names(info.data["lora"]))
            if len(v) != count:
                raise ValueError(f"lists {len(v)} weights but lora names {count} LoRAs: give one "
                                 "number for all or one per name")
        return v

    @staticmethod
    def _names(lora: str | list[str] | None) -> list[str]:
        return [] if lora is None else [lora] if isinstance(lora, str) else list(lora)

    def lora_names(self) -> list[str]:
        return self._names(self.lora)

    def lora_set(self) -> tuple[tuple[str, float], ...]:
        """The LoRAs to merge with their weights, sorted by name, zero weights left
        out: equal sets draw equal images, so batching keys on this."""
        names = self.lora_names()
        weights = self.lora_weight if isinstance(self.lora_weight, list) else [self.lora_weight] * len(names)
        return tuple(sorted((n, float(w)) for n, w in zip(names, weights) if w != 0))


class ImageResult(BaseModel):
    url: str
    thumbnail_url: str
    seed: int
    width: int
    height: int


class BatchInfo(BaseModel):
    id: str = Field(description="the batch this request ran in; step scheduler: its run of UNet calls "
                                "(requests with the same id shared calls)")
    size: int = Field(description="images in that batch; step scheduler: the most image rows in one "
                                  "UNet call it took part in")
    requests: int = Field(description="requests in that batch; step scheduler: the most requests in "
                                      "one UNet call it took part in")


class GenerateResult(BaseModel):
    """What a SUCCESS result holds, in the Celery backend and over REST."""

    schema_version: int = SCHEMA_VERSION
    images: list[ImageResult]
    batch: BatchInfo
    timings: dict[str, float]
    model: str
    model_version: str | None = Field(default=None, description="the version of the model's weights "
                                      "that drew the images; absent from results of older workers")
    sampler: Sampler
    steps: int
    cost: int | None = Field(default=None, description="cost units of what ran (imagegenx.cost); "
                                                       "absent from results of older workers")
    warnings: list[str] = Field(default_factory=list, description="what the images may not show as asked, "
                                "e.g. prompt words the shipped shapes model never saw")
    cached: bool = Field(default=False, description="answered from the stored images of an identical "
                                                    "earlier request, without drawing")


class Preview(BaseModel):
    """A small preview of a running request (the cheap latent-to-RGB projection)."""

    step: int = Field(description="steps done when the preview was taken")
    width: int
    height: int
    png_base64: str


class Progress(BaseModel):
    step: int
    total: int
    preview: Preview | None = Field(default=None, description="the latest preview, when asked for")


TaskState = Literal[
    "PENDING", "RECEIVED", "STARTED", "PROGRESS", "SUCCESS", "FAILURE", "REVOKED", "RETRY"
]


class SubmitResponse(BaseModel):
    task_id: str
    status_url: str
    seed: int
    cost: int = Field(description="cost units charged to the key's budget (imagegenx.cost); 0 when cached")
    cached: bool = Field(default=False, description="answered from the result cache: the task is "
                                                    "already SUCCESS")


class FieldError(BaseModel):
    field: str
    reason: str


class ErrorResponse(BaseModel):
    error: str
    fields: list[FieldError] | None = None


class TaskError(BaseModel):
    type: str
    message: str


class WebhookAttempt(BaseModel):
    at: float = Field(description="unix time the attempt started")
    status_code: int | None = Field(description="the receiver's HTTP status; null if none came")
    error: str | None = None
    duration_ms: float


class WebhookStatus(BaseModel):
    """Delivery of the task's callback_url (absent when it has none)."""

    state: Literal["queued", "retrying", "delivered", "failed", "refused"]
    attempts: list[WebhookAttempt]
    delivered_at: float | None = None
    reason: str | None = Field(default=None, description="why it was refused or gave up")


class TaskStatus(BaseModel):
    task_id: str
    state: TaskState
    progress: Progress | None = None
    result: GenerateResult | None = None
    error: TaskError | None = None
    webhook: WebhookStatus | None = None
