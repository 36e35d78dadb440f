"""Every bad input gets a clear 4xx JSON answer naming the field and the reason.

No worker is needed: invalid requests never reach the queue.
"""
from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from flask.testing import FlaskClient

from imagegenx.api import create_app
from imagegenx.settings import Settings

KEY = "unit-test-key"


@pytest.fixture(scope="module")
def client(redis_base: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FlaskClient]:
    settings = Settings(broker_url=f"{redis_base}/3", result_backend=f"{redis_base}/3",
                        queue="unit-validation", api_keys=[KEY], max_size=512, rate_limit="",
                        storage_root=tmp_path_factory.mktemp("files"))
    yield create_app(settings).test_client()


def post(client: FlaskClient, body: object, key: str | None = KEY, **kw: object):  # type: ignore[no-untyped-def]
    headers = {"X-API-Key": key} if key else {}
    if "data" in kw:
        return client.post("/api/v1/images", headers=headers, **kw)
    return client.post("/api/v1/images", json=body, headers=headers)


def test_missing_key_is_401(client: FlaskClient) -> None:
    r = post(client, {"prompt": "x"}, key=None)
    assert r.status_code == 401 and "X-API-Key" in r.json["error"]


def test_wrong_key_is_401(client: FlaskClient) -> None:
    assert post(client, {"prompt": "x"}, key="wrong").status_code == 401


def test_non_json_body_is_400(client: FlaskClient) -> None:
    r = post(client, None, data="prompt=x", content_type="application/x-www-form-urlencoded")
    assert r.status_code == 400 and "JSON" in r.json["error"]


def test_malformed_json_is_400(client: FlaskClient) -> None:
    r = post(client, None, data="{not json", content_type="application/json")
    assert r.status_code == 400


def test_json_array_is_400(client: FlaskClient) -> None:
    r = post(client, None, data="[1, 2]", content_type="application/json")
    assert r.status_code == 400 and "object" in r.json["error"]


def test_body_over_limit_is_413(client: FlaskClient) -> None:
    body = json.dumps({"prompt": "x" * 20000})
    r = post(client, None, data=body, content_type="application/json")
    assert r.status_code == 413
    assert r.json == {"error": "body too large: at most 16384 bytes (max_body_bytes)",
                      "max_body_bytes": 16384}


@pytest.mark.parametrize(
    ("body", "field", "reason"),
    [
        ({}, "prompt", "Field required"),
        ({"prompt": ""}, "prompt", "must have at least 1 character"),
        ({"prompt": "   "}, "prompt", "must have at least 1 character"),
        ({"prompt": "x" * 1001}, "prompt", "must have at most 1000 characters"),
        ({"prompt": "x", "negative_prompt": "y" * 1001}, "negative_prompt", "must have at most 1000 characters"),
        ({"prompt": "x", "width": 100}, "width", "must be a multiple of 8"),
        ({"prompt": "x", "height": 1024}, "height", "must be between 64 and 512"),
        ({"prompt": "x", "width": 8}, "width", "must be between 64 and 512"),
        ({"prompt": "x", "width": "wide"}, "width", "must be a number, not a string"),
        # Numbers given as text are refused, not parsed.
        ({"prompt": "x", "width": "128"}, "width", "must be a number, not a string"),
        ({"prompt": "x", "steps": "20"}, "steps", "must be a number, not a string"),
        ({"prompt": "x", "seed": "7"}, "seed", "must be a number, not a string"),
        ({"prompt": "x", "guidance_scale": "7.5"}, "guidance_scale", "must be a number, not a string"),
        ({"prompt": "x", "timeout_s": "60"}, "timeout_s", "must be a number, not a string"),
        ({"prompt": "x", "postprocess": {"thumbnail": "64"}}, "postprocess.thumbnail",
         "must be a number, not a string"),
        ({"prompt": "x", "postprocess": {"watermark": {"text": "w", "opacity": "0.5"}}},
         "postprocess.watermark.opacity", "must be a number, not a string"),
        ({"prompt": "x", "steps": 0}, "steps", "must be at least 1"),
        ({"prompt": "x", "steps": 101}, "steps", "must be at most 100"),
        ({"prompt": "x", "guidance_scale": -1}, "guidance_scale", "must be at least 0"),
        ({"prompt": "x", "guidance_scale": 31}, "guidance_scale", "must be at most 30"),
        ({"prompt": "x", "sampler": "plms"}, "sampler", "must be 'euler', 'euler_a', 'ddim' or 'dpmpp_2m'"),
        ({"prompt": "x", "seed": -1}, "seed", "must be at least 0"),
        ({"prompt": "x", "seed": 2**32}, "seed", "must be at most 4294967295"),
        ({"prompt": "x", "num_images": 0}, "num_images", "must be at least 1"),
        ({"prompt": "x", "num_images": 5}, "num_images", "must be at most 4"),
        ({"prompt": "x", "postprocess": {"thumbnail": 4}}, "postprocess.thumbnail", "must be at least 16"),
        ({"prompt": "x", "postprocess": {"watermark": {"text": "w", "opacity": 2}}},
         "postprocess.watermark.opacity", "must be at most 1"),
        ({"prompt": "x", "postprocess": {"watermark": {"text": "w", "position": "middle"}}},
         "postprocess.watermark.position", "must be 'top-left'"),
        ({"prompt": "x", "callback_url": "ftp://example.com/hook"}, "callback_url", "http or https"),
        ({"prompt": "x", "callback_url": "http://127.0.0.1/hook"}, "callback_url", "loopback"),
        ({"prompt": "x", "callback_url": "http://169.254.169.254/"}, "callback_url", "private"),
        ({"prompt": "x", "timeout_s": 0}, "timeout_s", "must be greater than 0"),
        ({"prompt": "x", "priority": 11}, "priority", "must be at most 10"),
        ({"prompt": "x", "priority": -1}, "priority", "must be at least 0"),
        ({"prompt": "x", "priority": True}, "priority", "not true or false"),
        ({"prompt": "x", "colour": "red"}, "colour", "Extra inputs are not permitted"),
        ({"prompt": "x", "guidance_interval": [0.6, 0.4]}, "guidance_interval",
         "must satisfy 0 <= start < end <= 1, got [0.6, 0.4]"),
        ({"prompt": "x", "guidance_interval": [0, 1.5]}, "guidance_interval", "0 <= start < end <= 1"),
        ({"prompt": "x", "guidance_interval": [0.5]}, "guidance_interval", "must be a list of two numbers"),
        ({"prompt": "x", "guidance_interval": "0,1"}, "guidance_interval", "must be a list of two numbers"),
        ({"prompt": "x", "guidance_interval": ["0", 1]}, "guidance_interval", "must be a number, not a string"),
    ],
)
def test_invalid_fields_are_422_with_field_and_reason(
    client: FlaskClient, body: dict, field: str, reason: str
) -> None:
    r = post(client, body)
    assert r.status_code == 422, r.json
    fields = {f["field"]: f["reason"] for f in r.json["fields"]}
    assert field in fields, fields
    assert reason in fields[field]


def test_several_bad_fields_are_all_named(client: FlaskClient) -> None:
    r = post(client, {"prompt": "", "width": 7, "steps": 1000})
    assert r.status_code == 422
    assert {f["field"] for f in r.json["fields"]} == {"prompt", "width", "steps"}


def test_unknown_task_is_404(client: FlaskClient) -> None:
    h = {"X-API-Key": KEY}
    assert client.get("/api/v1/tasks/00000000-0000-0000-0000-000000000000", headers=h).status_code == 404
    assert client.get("/api/v1/tasks/not-a-uuid", headers=h).status_code == 404
    assert client.delete("/api/v1/tasks/00000000-0000-0000-0000-000000000000", headers=h).status_code == 404


@pytest.mark.parametrize("key", ["../../etc/passwd", "..%2F..%2Fetc%2Fpasswd", "a/../../x.png",
                                 ".hidden", "%2e%2e/x"])
def test_file_paths_cannot_escape_the_storage_root(client: FlaskClient, key: str) -> None:
    r = client.get(f"/api/v1/files/{key}")
    assert r.status_code == 404
    assert r.is_json


def test_unknown_route_and_method_are_json(client: FlaskClient) -> None:
    r = client.get("/api/v1/nothing")
    assert r.status_code == 404 and r.is_json
    r = client.put("/api/v1/images", headers={"X-API-Key": KEY})
    assert r.status_code == 405 and r.is_json
