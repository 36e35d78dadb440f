"""What a task message must look like before a worker builds a request from it.

Celery's request and strategies trust the message: a body that is not
``[args, kwargs, embed]``, an ``id`` that is not a string or a ``timelimit``
that is not a pair raise where the consumer does not catch them, and the
worker exits. These checks run first, so that such a message is rejected
alone. Pure: no Celery, no I/O; ``now`` is an argument.
"""
from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

MAX_ID_LENGTH = 255


class MalformedMessage(ValueError):
    """The message cannot be turned into a request; the reason says why."""


def usable_task_id(headers: Any) -> str | None:
    """The message's task id if a result can be stored under it, else None."""
    if not isinstance(headers, Mapping):
        return None
    task_id = headers.get("id")
    if isinstance(task_id, str) and 0 < len(task_id) <= MAX_ID_LENGTH and task_id.isprintable():
        return task_id
    return None


def check_headers(headers: Any) -> None:
    """Raise MalformedMessage unless the protocol 2 headers have usable types."""
    if not isinstance(headers, Mapping):
        raise MalformedMessage(f"headers must be a mapping, not {_kind(headers)}")
    if usable_task_id(headers) is None:
        raise MalformedMessage(f"id must be a non-empty printable string of at most "
                               f"{MAX_ID_LENGTH} characters, not {_short(headers.get('id'))}")
    for name in ("task", "shadow", "root_id", "parent_id", "group"):
        value = headers.get(name)
        if value is not None and not isinstance(value, str):
            raise MalformedMessage(f"{name} must be a string, not {_short(value)}")
    retries = headers.get("retries", 0)
    if retries is not None and (isinstance(retries, bool) or not isinstance(retries, int)
                                or retries < 0):
        raise MalformedMessage(f"retries must be a non-negative integer, not {_short(retries)}")
    timelimit = headers.get("timelimit")
    if timelimit is not None and not _is_time_limits(timelimit):
        raise MalformedMessage(f"timelimit must be [hard, soft] seconds or nulls, "
                               f"not {_short(timelimit)}")
    for name in ("eta", "expires"):
        parse_time(name, headers.get(name))


def check_body(body: Any) -> None:
    """Raise MalformedMessage unless the decoded body is ``[args, kwargs, embed]``."""
    if not isinstance(body, (list, tuple)) or len(body) != 3:
        raise MalformedMessage(f"body must be [args, kwargs, embed], not {_short(body)}")
    args, kwargs, embed = body
    if not isinstance(args, (list, tuple)):
        raise MalformedMessage(f"args must be a list, not {_short(args)}")
    if not isinstance(kwargs, Mapping):
        raise MalformedMessage(f"kwargs must be an object, not {_short(kwargs)}")
    if embed is not None and not isinstance(embed, Mapping):
        raise MalformedMessage(f"embed must be an object, not {_short(embed)}")


def parse_time(name: str, value: Any) -> datetime | None:
    """An ``eta``/``expires`` header as an aware datetime (naive means UTC)."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise MalformedMessage(f"{name} must be an ISO 8601 string, not {_short(value)}")
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        raise MalformedMessage(f"{name} is not an ISO 8601 time: {_short(value)}") from None
    return when if when.tzinfo else when.replace(tzinfo=timezone.utc)


def check_eta(headers: Mapping[str, Any], now: datetime, horizon_s: float) -> None:
    """Refuse an ``eta`` further away than ``horizon_s``.

    A worker holds a message until its eta without acknowledging it; held
    past the visibility timeout, the broker delivers it to a second worker.
    """
    eta = parse_time("eta", headers.get("eta"))
    if eta is not None and (eta - now).total_seconds() > horizon_s:
        raise MalformedMessage(
            f"eta {headers['eta']} is more than {horizon_s:.0f} s away, past what the "
            "visibility timeout lets a worker hold a message; send it closer to when it "
            "should run")


def _is_time_limits(value: Any) -> bool:
    return (isinstance(value, (list, tuple)) and len(value) == 2
            and all(v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)
                                  and v >= 0) for v in value))


def _kind(value: Any) -> str:
    return type(value).__name__


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({_kind(value)})"
