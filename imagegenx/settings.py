"""Service settings: code defaults < YAML file < IMAGEGENX_* environment variables.

One object configures the API, the worker and the CLI, so the two sides of the
queue never disagree about broker, queue name or request bounds.
"""
from __future__ import annotations

import hashlib
import os
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)
from typing_extensions import Annotated

from imagegenx.batching import prefetch_window
from imagegenx.schemas import Limits

CONFIG_ENV = "IMAGEGENX_CONFIG"


def _yaml_path() -> Path | None:
    path = os.environ.get(CONFIG_ENV)
    return Path(path) if path else None


def hash_api_key(key: str) -> str:
    """API keys are kept as sha256 hex digests; plain keys never leave the request."""
    return hashlib.sha256(key.encode()).hexdigest()


class Settings(BaseSettings):
    """Every knob of the service. See the README's configuration table."""

    model_config = SettingsConfigDict(env_prefix="IMAGEGENX_", extra="ignore")

    # Queue
    broker_url: str = "redis://127.0.0.1:6379/0"
    result_backend: str = "redis://127.0.0.1:6379/0"
    queue: str = "imagegenx"
    result_expires_s: int = 86400
    visibility_timeout_s: int = 3600

    # Batching
    max_batch: int = Field(default=8, ge=1, le=256)
    max_wait_ms: float = Field(default=50.0, ge=0.0, le=60_000.0)
    prefetch_batches: int = Field(default=2, ge=2, description="full batches a worker may hold")
    expected_batch_s: float = Field(default=60.0, gt=0, description="worst-case time of one batch")

    # Engine
    engine: Literal["diffusion", "synthetic"] = "diffusion"
    model: Path = Path("var/models/tiny")
    model_name: str = ""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "fp32", "fp16", "bf16"] = "auto"
    synthetic_cost: Literal["zero", "sd15-h200"] = "zero"
    progress_interval_s: float = Field(default=0.5, ge=0.0)
    # GPU fast path (CUDA only; ignored on the CPU). Prepared at worker start.
    compile: bool = Field(default=True, description="torch.compile the UNet and the VAE decode")
    cuda_graphs: bool = Field(default=True, description="one CUDA graph per batch-size bucket")
    batch_buckets: Annotated[list[int], NoDecode] = Field(
        default_factory=lambda: [1, 2, 4, 8, 16, 32],
        description="batch sizes (images) the UNet is captured at; a batch runs padded to the next one",
    )

    # Storage and API
    data_dir: Path = Field(default=Path("var"), description="state of `imagegenx up` (generated API key)")
    storage_root: Path = Path("var/images")
    public_url: str = Field(default="", description="base of image URLs; default http://api_host:api_port")
    api_host: str = "127.0.0.1"
    api_port: int = 8000
    flower_port: int = 5555
    api_keys: Annotated[list[str], NoDecode] = Field(default_factory=list)
    api_key_hashes: Annotated[list[str], NoDecode] = Field(default_factory=list)
    max_body_bytes: int = 16 * 1024

    # Request bounds
    max_prompt_chars: int = 1000
    min_size: int = 64
    max_size: int = 1024
    max_steps: int = 100
    max_num_images: int = 4
    max_guidance: float = 30.0

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

    @field_validator("api_keys", "api_key_hashes", mode="before")
    @classmethod
    def _split_csv(cls, v: Any) -> Any:
        if isinstance(v, str):
            return [part.strip() for part in v.split(",") if part.strip()]
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

    @model_validator(mode="after")
    def _check(self) -> "Settings":
        if self.max_num_images > self.max_batch:
            raise ValueError("max_num_images must not exceed max_batch")
        if self.min_size > self.max_size:
            raise ValueError("min_size must not exceed max_size")
        if self.visibility_timeout_s <= self.worst_wait_s:
            raise ValueError(
                f"visibility_timeout_s ({self.visibility_timeout_s}) must exceed the longest "
                f"time a message can stay unacknowledged ({self.worst_wait_s:.0f} s: "
                "max_wait + prefetch_batches x expected_batch_s); otherwise tasks run twice"
            )
        return self

    @property
    def max_wait_s(self) -> float:
        return self.max_wait_ms / 1000.0

    @property
    def prefetch(self) -> int:
        """Unacknowledged messages one worker may hold (buffered + running)."""
        return prefetch_window(self.max_batch, self.prefetch_batches)

    @property
    def worst_wait_s(self) -> float:
        return self.max_wait_s + self.prefetch_batches * self.expected_batch_s

    @property
    def limits(self) -> Limits:
        return Limits(
            max_prompt_chars=self.max_prompt_chars,
            min_size=self.min_size,
            max_size=self.max_size,
            max_steps=self.max_steps,
            max_num_images=self.max_num_images,
            max_guidance=self.max_guidance,
        )

    @property
    def public_base(self) -> str:
        return (self.public_url or f"http://{self.api_host}:{self.api_port}").rstrip("/")

    @property
    def served_model_name(self) -> str:
        return self.model_name or self.model.name

    def key_digests(self) -> frozenset[str]:
        """All accepted key digests: hashed plain keys plus pre-hashed ones."""
        return frozenset([hash_api_key(k) for k in self.api_keys] + list(self.api_key_hashes))


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
