"""Scaling signals from the queue and the workers: pure arithmetic over what
Redis and the workers' ``batching`` replies hold (``GET /api/v1/queue``).

Drain estimate: waiting requests x mean image-steps of a waiting request /
measured image-steps per second of all live workers. Waiting requests are the
queue's messages plus those buffered in workers; the mean is taken over the
newest-to-oldest messages sampled at the queue's tail (``steps x num_images``
of each); the throughput is each worker's image rows per second of UNet calls
since it started (``unet_rows / unet_seconds``, the step scheduler's counters),
summed. Decoding and storing are not counted, so the estimate is a lower bound.
"""
from __future__ import annotations

import base64
import json
from datetime import datetime
from typing import Any

# Message header the API sets at submission: when the task was sent (epoch seconds).
SENT_AT_HEADER = "imagegenx_sent_at"
DEFAULT_STEPS = 20


def _headers_and_kwargs(raw: bytes | str) -> tuple[dict[str, Any], dict[str, Any]]:
    """A kombu Redis message's headers and task kwargs (empty where unreadable)."""
    try:
        msg = json.loads(raw)
        headers = msg.get("headers") or {}
        body: Any = msg.get("body")
        if (msg.get("properties") or {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        decoded = json.loads(body)
        kwargs = decoded[1] if isinstance(decoded, list) and len(decoded) > 1 else {}
    except (ValueError, TypeError, AttributeError, KeyError, IndexError):
        return {}, {}
    return (headers if isinstance(headers, dict) else {},
            kwargs if isinstance(kwargs, dict) else {})


def sent_at(raw: bytes | str) -> float | None:
    """When a waiting message was sent: the API's header, else its ``eta``."""
    headers, _ = _headers_and_kwargs(raw)
    value = headers.get(SENT_AT_HEADER)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    eta = headers.get("eta")
    if isinstance(eta, str):
        try:
            return datetime.fromisoformat(eta).timestamp()
        except ValueError:
            return None
    return None


def image_steps(raw: bytes | str) -> int | None:
    """Denoising steps x images of a waiting generation message."""
    _, kwargs = _headers_and_kwargs(raw)
    if not kwargs:
        return None
    steps, images = kwargs.get("steps", DEFAULT_STEPS), kwargs.get("num_images", 1)
    if not (isinstance(steps, int) and isinstance(images, int)):
        return None
    return steps * images


def oldest_age_s(tail: list[bytes | str], now: float) -> float | None:
    """Age of the oldest message among the lists' tails (oldest message of each list)."""
    times = [t for t in (sent_at(raw) for raw in tail) if t is not None]
    return round(max(0.0, now - min(times)), 3) if times else None


def throughput(reply: dict[str, Any]) -> float | None:
    """A worker's measured image-steps per second (None before its first UNet call)."""
    rows, seconds = reply.get("unet_rows"), reply.get("unet_seconds")
    if not isinstance(rows, (int, float)) or not isinstance(seconds, (int, float)) or seconds <= 0:
        return None
    return rows / seconds


def drain_s(waiting: int, mean_image_steps: float | None, image_steps_per_s: float) -> float | None:
    """Seconds to work off ``waiting`` requests (None when it cannot be told)."""
    if waiting == 0:
        return 0.0
    if mean_image_steps is None or image_steps_per_s <= 0:
        return None
    return round(waiting * mean_image_steps / image_steps_per_s, 3)
