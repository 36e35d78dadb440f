"""postprocess.upscale at the API: allowed factors, and the bound on the
upscaled side (max_upscaled_side), as 422 answers naming the field, and in the
published OpenAPI schema."""
from __future__ import annotations

from collections.abc import Iterator

import jsonschema
import pytest
from flask.testing import FlaskClient

from imagegenx.api import create_app
from imagegenx.api.openapi import build_spec
from imagegenx.settings import Settings

KEY = "unit-upscale-key"
FIELD = "postprocess.upscale"


@pytest.fixture(scope="module")
def settings(redis_base: str, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return Settings(broker_url=f"{redis_base}/3", result_backend=f"{redis_base}/3",
                    queue="unit-upscale", api_keys=[KEY], max_size=512, max_upscaled_side=1024,
                    rate_limit="", storage_root=tmp_path_factory.mktemp("files"))


@pytest.fixture(scope="module")
def client(settings: Settings) -> Iterator[FlaskClient]:
    yield create_app(settings).test_client()


def post(client: FlaskClient, body: dict):  # type: ignore[no-untyped-def,type-arg]
    return client.post("/api/v1/images", json=body, headers={"X-API-Key": KEY})


def reasons(response) -> dict[str, str]:  # type: ignore[no-untyped-def]
    assert response.status_code == 422, response.json
    return {f["field"]: f["reason"] for f in response.json["fields"]}


@pytest.mark.parametrize(("upscale", "reason"), [
    (3, "must be 1, 2 or 4"),
    (8, "must be 1, 2 or 4"),
    (0, "must be 1, 2 or 4"),
    ("2", "must be a number, not a string"),
    (True, "not true or false"),
])
def test_only_1_2_and_4_are_factors(client: FlaskClient, upscale: object, reason: str) -> None:
    r = post(client, {"prompt": "x", "width": 64, "height": 64, "postprocess": {"upscale": upscale}})
    assert reason in reasons(r)[FIELD]


def test_an_upscaled_side_over_the_bound_is_422(client: FlaskClient) -> None:
    r = post(client, {"prompt": "x", "width": 512, "height": 256, "postprocess": {"upscale": 4}})
    assert reasons(r) == {FIELD: "x4 of 512x256 gives 2048x1024; the largest side allowed is 1024"}


def test_an_unset_size_counts_as_max_size(client: FlaskClient) -> None:
    r = post(client, {"prompt": "x", "width": 128, "postprocess": {"upscale": 4}})
    assert "counts as max_size, 512" in reasons(r)[FIELD]


def test_other_bad_fields_are_named_too(client: FlaskClient) -> None:
    r = post(client, {"prompt": "", "width": 512, "height": 512, "postprocess": {"upscale": 4}})
    assert set(reasons(r)) == {"prompt", FIELD}


def test_a_bad_size_is_reported_once(client: FlaskClient) -> None:
    r = post(client, {"prompt": "x", "width": 1000, "postprocess": {"upscale": 4}})
    assert set(reasons(r)) == {"width"}


@pytest.mark.parametrize("body", [
    {"prompt": "x", "width": 256, "height": 256, "postprocess": {"upscale": 4}},
    {"prompt": "x", "postprocess": {"upscale": 2}},
    {"prompt": "x", "width": 512, "postprocess": {"upscale": 1}},
])
def test_sizes_within_the_bound_are_accepted(client: FlaskClient,
                                             body: dict) -> None:  # type: ignore[type-arg]
    assert post(client, body).status_code == 202


def test_the_openapi_schema_carries_the_bound(settings: Settings) -> None:
    spec = build_spec(settings.limits)
    validator = jsonschema.Draft202012Validator(
        {"$ref": "#/components/schemas/GenerateRequest", "components": spec["components"]})
    ok = [{"prompt": "x", "width": 256, "height": 256, "postprocess": {"upscale": 4}},
          {"prompt": "x", "postprocess": {"upscale": 2}}, {"prompt": "x", "width": 512}]
    bad = [{"prompt": "x", "width": 512, "height": 256, "postprocess": {"upscale": 4}},
           {"prompt": "x", "width": 128, "postprocess": {"upscale": 4}},
           {"prompt": "x", "postprocess": {"upscale": 3}}]
    assert [validator.is_valid(b) for b in ok] == [True] * 3
    assert [validator.is_valid(b) for b in bad] == [False] * 3
