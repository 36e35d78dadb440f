"""Property-based fuzzing of the API from its own OpenAPI document (schemathesis).

Every operation gets valid and invalid inputs generated from the spec the
server publishes at /api/v1/openapi.json, authenticated and not. Every answer
must be a documented status with a documented body: never a 5xx, never a
hang. The run is bounded (a few dozen examples per operation and phase).
No worker is needed: accepted requests stay in a private queue, removed after.
"""
from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import pytest
import redis
import schemathesis
from flask.testing import FlaskClient
from hypothesis import HealthCheck, Phase, assume, given, settings
from hypothesis import example
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import Case, GenerationMode
from schemathesis.checks import not_a_server_error

from imagegenx.api import create_app
from imagegenx.settings import Settings

KEY = f"fuzz-{uuid.uuid4().hex}"
QUEUE = f"unit-fuzz-{uuid.uuid4().hex[:8]}"
MAX_EXAMPLES = 25


@pytest.fixture(scope="module")
def fuzz_settings(redis_base: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    s = Settings(broker_url=f"{redis_base}/3", result_backend=f"{redis_base}/3", queue=QUEUE,
                 api_keys=[KEY], storage_root=tmp_path_factory.mktemp("fuzz-files"),
                 webhook_secret="fuzz-secret", rate_limit="", status_rate_limit="",
                 workers_inspect_timeout_s=0.2,
                 # The cost limits bound a product of fields, which a JSON schema cannot
                 # state: a schema-valid request may be refused for its cost (422 `cost`).
                 max_request_cost=0, cost_budget_per_minute=0,
                 # No LoRA folder: generated names are left to the worker, not refused here.
                 lora_dir=tmp_path_factory.mktemp("fuzz-loras") / "absent")
    yield s
    redis.Redis.from_url(s.broker_url).delete(QUEUE)


_APPS: dict[int, FlaskClient] = {}


def fuzz_app(fuzz_settings: Settings) -> FlaskClient:
    """One test client per settings object: building an app costs more than a request."""
    if id(fuzz_settings) not in _APPS:
        _APPS[id(fuzz_settings)] = create_app(fuzz_settings).test_client()
    return _APPS[id(fuzz_settings)]


def operations(fuzz_settings: Settings):  # type: ignore[no-untyped-def]
    schema = schemathesis.openapi.from_wsgi("/api/v1/openapi.json", create_app(fuzz_settings))
    return [result.ok() for result in schema.get_all_operations()]


def test_spec_lists_the_operations_fuzzed(fuzz_settings: Settings) -> None:
    labels = {op.label for op in operations(fuzz_settings)}
    assert labels >= {"POST /api/v1/images", "GET /api/v1/tasks/{task_id}",
                      "DELETE /api/v1/tasks/{task_id}", "GET /api/v1/files/{key}", "GET /healthz"}


# Answers that report the state of the service rather than a fault: with no
# worker running here, health is degraded (503) by design.
DEGRADED_OK = {"GET /healthz"}


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_api_answers_every_generated_request_as_documented(fuzz_settings: Settings,
                                                           mode: GenerationMode) -> None:
    for op in operations(fuzz_settings):
        takes_input = bool(list(op.iter_parameters()) or list(op.body))
        excluded = [not_a_server_error] if op.label in DEGRADED_OK else []

        @given(case=op.as_strategy(generation_mode=mode))
        @settings(max_examples=MAX_EXAMPLES if takes_input else 3, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck), phases=[Phase.generate])
        def run(case: Case) -> None:
            # The one rule JSON Schema cannot state (it compares two items): a guidance
            # interval's start is below its end. The document says it in the field's
            # description and tests/unit/test_api_validation.py checks its 422.
            interval = case.body.get("guidance_interval") if isinstance(case.body, dict) else None
            if mode.is_positive and isinstance(interval, list) and len(interval) == 2:
                assume(not all(isinstance(x, (int, float)) for x in interval) or interval[0] < interval[1])
            t0 = time.perf_counter()
            response = case.call_and_validate(headers={"X-API-Key": KEY}, excluded_checks=excluded)
            elapsed = time.perf_counter() - t0
            assert elapsed < 5.0, f"{case.operation.label} took {elapsed:.1f} s"
            if case.operation.label in DEGRADED_OK:
                assert response.status_code in (200, 503) and response.json()["status"]
            else:
                assert response.status_code < 500, response.text

        try:
            run()
        except Unsatisfiable:
            # Only in negative mode, for an operation whose every input is an
            # unconstrained string (or that takes none): nothing to negate.
            assert not mode.is_positive, op.label


# Shapes the spec-driven generator rarely draws: storage keys as long as the
# server accepts (512) made of valid characters, whose segments pass the file
# system's 255-byte name limit (ENAMETOOLONG was a 500), and JSON bodies nested
# past the decoder's recursion limit (RecursionError was a 500), yet under 16 KB.
EDGE_EXAMPLES = 60


@given(key=st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,511}", fullmatch=True))
@settings(max_examples=EDGE_EXAMPLES, deadline=None, database=None,
          suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate])
@example(key="a" * 256)
def test_long_file_keys_are_answered_404(fuzz_settings: Settings, key: str) -> None:
    r = fuzz_app(fuzz_settings).get(f"/api/v1/files/{key}")
    assert r.status_code == 404 and r.json == {"error": "no such file"}


@given(depth=st.integers(min_value=1, max_value=2600), opener=st.sampled_from("[{"))
@settings(max_examples=EDGE_EXAMPLES, deadline=None, database=None,
          suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate])
@example(depth=2500, opener="[")
def test_deeply_nested_json_is_a_4xx_naming_the_body(fuzz_settings: Settings, depth: int,
                                                     opener: str) -> None:
    closer = {"[": "]", "{": "}"}[opener]
    inner = opener * depth + closer * depth if opener == "[" else '{"a":' * depth + "1" + "}" * depth
    body = '{"prompt": "x", "seed": ' + inner + "}"
    r = fuzz_app(fuzz_settings).post("/api/v1/images", data=body, headers={
        "X-API-Key": KEY, "Content-Type": "application/json"})
    assert r.status_code in (400, 422), r.text
    if r.status_code == 400:
        assert "body" in r.json["error"] and "nested" in r.json["error"]


@pytest.mark.parametrize(("body", "field", "reason"), [
    # Found by the fuzzer: JSON true/false was read as 1/0.
    ({"prompt": "x", "seed": True}, "seed", "not true or false"),
    ({"prompt": "x", "steps": False}, "steps", "not true or false"),
    ({"prompt": "x", "postprocess": {"thumbnail": True}}, "postprocess.thumbnail", "not true or false"),
    # Found by the fuzzer: lengths were checked after stripping whitespace, so
    # texts longer than the published maxLength were accepted.
    ({"prompt": "\r" + "x" * 1000}, "prompt", "at most 1000 characters"),
    ({"prompt": "x", "negative_prompt": "y" * 1000 + " "}, "negative_prompt", "at most 1000"),
    ({"prompt": "x", "callback_url": " https://example.com/" + "a" * 2030}, "callback_url",
     "at most 2048 characters"),
])
def test_fuzz_findings_stay_fixed(fuzz_settings: Settings, body: dict, field: str, reason: str) -> None:
    r = create_app(fuzz_settings).test_client().post("/api/v1/images", json=body,
                                                     headers={"X-API-Key": KEY})
    assert r.status_code == 422
    assert reason in {f["field"]: f["reason"] for f in r.json["fields"]}[field]


def test_spec_states_the_rules_the_server_enforces(fuzz_settings: Settings) -> None:
    """Also found by the fuzzer: schema-valid requests the server refused."""
    spec = create_app(fuzz_settings).test_client().get("/api/v1/openapi.json").json
    req = spec["components"]["schemas"]["GenerateRequest"]
    assert req["properties"]["prompt"]["pattern"] == r"\S"  # blank prompts are refused
    assert "start must be less than end" in req["properties"]["guidance_interval"]["description"]
    assert req["properties"]["callback_url"]["anyOf"][0]["pattern"].startswith("^https?://")
    rule = {r["if"]["properties"]["num_images"]["const"]: r["then"]["properties"]["seed"]["anyOf"][0]["maximum"]
            for r in req["allOf"]}
    assert rule == {2: 2**32 - 2, 3: 2**32 - 3, 4: 2**32 - 4}  # seed + num_images - 1 < 2^32
    submit = spec["paths"]["/api/v1/images"]["post"]["responses"]
    assert "Retry-After" in submit["429"]["headers"] and "Retry-After" in submit["503"]["headers"]
    assert "taskFinished" in spec["webhooks"]
