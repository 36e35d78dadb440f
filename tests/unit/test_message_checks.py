"""The checks a task message passes before a worker builds a request from it."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from workers.message_checks import (
    MalformedMessage, check_body, check_eta, check_headers, parse_time, usable_task_id,
)

GOOD = {"task": "imagegenx.generate", "id": "3f1c", "retries": 0, "eta": None,
        "expires": None, "timelimit": [None, None], "root_id": "3f1c", "parent_id": None,
        "group": None}
NOW = datetime(2030, 1, 1, tzinfo=timezone.utc)


def headers(**override: Any) -> dict[str, Any]:
    return {**GOOD, **override}


def test_well_formed_headers_and_body_pass() -> None:
    check_headers(headers(retries=3, timelimit=[60, 30.5], expires="2030-01-01T00:00:00Z"))
    check_body([[], {"prompt": "x"}, {"callbacks": None}])
    check_body(([1], {}, None))


@pytest.mark.parametrize("override,reason", [
    ({"id": None}, "id must be"),
    ({"id": 12}, "id must be"),
    ({"id": ""}, "id must be"),
    ({"id": "a\nb"}, "id must be"),
    ({"id": "x" * 256}, "id must be"),
    ({"task": 5}, "task must be a string"),
    ({"shadow": ["x"]}, "shadow must be a string"),
    ({"retries": "many"}, "retries must be"),
    ({"retries": -1}, "retries must be"),
    ({"retries": 1.5}, "retries must be"),
    ({"retries": True}, "retries must be"),
    ({"timelimit": "abc"}, "timelimit must be"),
    ({"timelimit": [1]}, "timelimit must be"),
    ({"timelimit": [-1, None]}, "timelimit must be"),
    ({"eta": "tomorrow"}, "eta is not an ISO 8601 time"),
    ({"eta": 1700000000}, "eta must be an ISO 8601 string"),
    ({"expires": {"at": 1}}, "expires must be an ISO 8601 string"),
])
def test_bad_headers_are_refused_with_the_reason(override: dict[str, Any], reason: str) -> None:
    with pytest.raises(MalformedMessage, match=reason):
        check_headers(headers(**override))


def test_headers_that_are_not_a_mapping_are_refused() -> None:
    with pytest.raises(MalformedMessage, match="headers must be a mapping, not list"):
        check_headers(["id"])


@pytest.mark.parametrize("body,reason", [
    ("just a string", "body must be"),
    ({"prompt": "x"}, "body must be"),
    (None, "body must be"),
    ([[], {}], "body must be"),
    ([[], {}, {}, 1], "body must be"),
    (["abc", {}, {}], "args must be a list"),
    ([[], ["prompt"], {}], "kwargs must be an object"),
    ([[], {}, "embed"], "embed must be an object"),
])
def test_bodies_not_args_kwargs_embed_are_refused(body: Any, reason: str) -> None:
    with pytest.raises(MalformedMessage, match=reason):
        check_body(body)


def test_a_huge_value_is_shortened_in_the_reason() -> None:
    with pytest.raises(MalformedMessage) as info:
        check_body("x" * 10_000_000)
    assert len(str(info.value)) < 200 and "(str)" in str(info.value)


def test_usable_task_id() -> None:
    assert usable_task_id({"id": "abc"}) == "abc"
    assert usable_task_id({"id": 3}) is None
    assert usable_task_id({}) is None
    assert usable_task_id("not headers") is None


def test_naive_times_are_utc() -> None:
    assert parse_time("eta", "2030-01-01T00:00:00") == NOW
    assert parse_time("eta", "2030-01-01T01:00:00+01:00") == NOW
    assert parse_time("eta", None) is None


def test_eta_within_the_horizon_passes_and_beyond_it_is_refused() -> None:
    check_eta(headers(eta=(NOW + timedelta(seconds=100)).isoformat()), NOW, 100)
    check_eta(headers(eta=(NOW - timedelta(days=1)).isoformat()), NOW, 100)
    check_eta(headers(), NOW, 100)
    with pytest.raises(MalformedMessage, match="more than 100 s away.*visibility timeout"):
        check_eta(headers(eta=(NOW + timedelta(seconds=101)).isoformat()), NOW, 100)
