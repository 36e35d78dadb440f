"""Result cache: a request identical to an earlier one of the same API key, with a
fixed seed, is answered from the earlier task's stored images without a GPU.

- ``fingerprint`` (pure) hashes every field that changes the pixels, with defaults
  filled in and LoRAs in their canonical form, and the served model's name;
  fields that only change how or when a request runs (priority, callback_url,
  callback_events, timeout_s, preview, cache) are left out. A hit that asked for a
  webhook gets its ``completed`` delivery from the API (``api.images``).
- Redis holds ``(key digest, fingerprint) -> task id`` for the results' lifetime,
  written when a seeded request is queued (by one that skipped the cache only
  where nothing is remembered yet). A later identical request reads it
  and takes the earlier result only if that task is SUCCESS and its files still
  exist; otherwise it runs, and its task becomes the one remembered.
- The index is per API key: a hit answers a new task of the caller's own key
  whose result names the caller's own earlier task's files. Sharing across keys
  would tell one key that another asked for the same prompt and seed, and hand
  it the other key's file URLs (which name that key's task id).
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from typing import Any

from prometheus_client import Counter
from redis import Redis

from imagegenx.api.metrics import REGISTRY
from imagegenx.schemas import SCHEMA_VERSION, GenerateRequest

PREFIX = "imagegenx:result-cache:"
# Fields that do not change the pixels: how, when and for whom a request runs.
NOT_PIXELS = frozenset({"priority", "callback_url", "callback_events", "timeout_s", "preview", "cache"})
# Hashed in their canonical form instead (lora_set: sorted, zero weights left out).
_LORA_FIELDS = frozenset({"lora", "lora_weight"})

LOOKUPS = Counter("imagegenx_api_result_cache", "Result cache lookups of cacheable submissions "
                  "(a seed and cache on), by outcome (hit, miss)", ["outcome"], registry=REGISTRY)
for _outcome in ("hit", "miss"):
    LOOKUPS.labels(_outcome)  # present at 0 from the start


def fingerprint(req: GenerateRequest, model: str) -> str:
    """sha256 over the canonical JSON of what decides the images of ``req``."""
    fields = req.model_dump(mode="json", exclude=set(NOT_PIXELS | _LORA_FIELDS))
    fields["loras"] = [[name, weight] for name, weight in req.lora_set()]
    fields["model"] = model
    fields["schema_version"] = SCHEMA_VERSION
    text = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


def wants_cache(req: GenerateRequest, default: bool) -> bool:
    """A request may be answered from the cache: its own seed, cache on. (A hit with
    a ``callback_url`` gets its ``completed`` webhook from the API.)"""
    use = default if req.cache is None else req.cache
    return use and req.seed is not None


def image_keys(task_id: str, result: Mapping[str, Any]) -> list[str]:
    """Storage keys of a result's images and thumbnails (the pipeline's naming)."""
    count = len(result.get("images") or [])
    return [k for i in range(count) for k in (f"{task_id}/{i}.png", f"{task_id}/{i}.thumb.png")]


def reusable(task_id: str, meta: Mapping[str, Any], model: str,
             exists: Callable[[str], bool]) -> dict[str, Any] | None:
    """The earlier task's result marked cached, when it can answer again: SUCCESS,
    drawn by the same model, with images, every stored file still there."""
    result = meta.get("result")
    if meta.get("status") != "SUCCESS" or not isinstance(result, dict):
        return None
    if result.get("model") != model or not result.get("images"):
        return None
    if not all(exists(k) for k in image_keys(task_id, result)):
        return None
    return {**result, "cached": True}


class ResultIndex:
    """(key digest, fingerprint) -> the task that drew it, in the API's Redis."""

    def __init__(self, client: Redis, ttl_s: int) -> None:
        self.redis = client
        self.ttl_s = ttl_s

    @staticmethod
    def key(digest: str, fp: str) -> str:
        return f"{PREFIX}{digest}:{fp}"

    def lookup(self, digest: str, fp: str) -> str | None:
        raw = self.redis.get(self.key(digest, fp))
        return None if raw is None else raw.decode() if isinstance(raw, bytes) else str(raw)

    def remember(self, digest: str, fp: str, task_id: str, replace: bool = True) -> None:
        """Point at ``task_id``; with ``replace`` False only where nothing is remembered
        (a request that skipped the cache must not displace a result that answers)."""
        self.redis.set(self.key(digest, fp), task_id, ex=self.ttl_s, nx=not replace)
