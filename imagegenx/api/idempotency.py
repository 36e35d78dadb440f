"""Idempotent submission: an ``Idempotency-Key`` header makes a retried POST
return the task the first one created instead of queueing a second.

Redis holds ``(key digest, idempotency key) -> (body hash, task id, seed, cost)``,
claimed with SET NX for the results' lifetime, so of concurrent duplicates
exactly one creates a task. The body hash is taken over the validated request
before the server picks a seed, so a retry without a seed matches.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Any

from redis import Redis

from imagegenx.api.errors import ApiError

HEADER = "Idempotency-Key"
MAX_CHARS = 128
PREFIX = "imagegenx:idem:"
# Deletes the claim only while it is still ours (a failed submission frees its key).
_RELEASE = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"


def check_header(value: str | None) -> str | None:
    """The header's value, None when absent, or 400 naming the header."""
    if value is None:
        return None
    reason = None
    if not value:
        reason = "must not be empty"
    elif len(value) > MAX_CHARS:
        reason = f"at most {MAX_CHARS} characters (got {len(value)})"
    elif not (value.isascii() and value.isprintable()):
        reason = "printable ASCII characters only"
    if reason:
        raise ApiError(400, f"invalid {HEADER} header: {reason}", field=HEADER, reason=reason)
    return value


def body_hash(validated: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of a validated request (sorted keys, no spaces)."""
    text = json.dumps(validated, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class Claim:
    """What the first submission under an idempotency key created."""

    body_hash: str
    task_id: str
    seed: int
    cost: int

    def encode(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


class IdempotencyStore:
    """Claims of idempotency keys, per API key, in the API's Redis."""

    def __init__(self, client: Redis, ttl_s: int) -> None:
        self.redis = client
        self.ttl_s = ttl_s

    @staticmethod
    def key(digest: str, idem_key: str) -> str:
        # Hashed: the client's string never becomes part of a Redis key as is.
        return f"{PREFIX}{digest}:{hashlib.sha256(idem_key.encode()).hexdigest()}"

    def claim(self, digest: str, idem_key: str, claim: Claim) -> Claim | None:
        """Store ``claim`` if the key is free (returns None), else the earlier claim."""
        name = self.key(digest, idem_key)
        for _ in range(3):  # the earlier claim may expire between SET NX and GET
            if self.redis.set(name, claim.encode(), nx=True, ex=self.ttl_s):
                return None
            raw = self.redis.get(name)
            if raw is not None:
                return Claim(**json.loads(raw))
        raise ApiError(409, f"{HEADER} is being reused too quickly; retry", field=HEADER)

    def release(self, digest: str, idem_key: str, claim: Claim) -> None:
        """Free the key after the submission failed, unless another claim replaced ours."""
        self.redis.eval(_RELEASE, 1, self.key(digest, idem_key), claim.encode())
