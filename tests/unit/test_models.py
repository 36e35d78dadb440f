"""Several models behind one API: the IMAGEGENX_MODELS forms, a queue per model,
the request's ``model`` field (422 for an unknown one), GET /api/v1/models, and the
503 for a model whose queue has grown with no live worker.

No worker runs: queues are Redis lists the tests read; worker replies are faked
where a test needs some.
"""
from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis
from pydantic import ValidationError

from imagegenx.api import create_app
from imagegenx.api.workers import WorkerInfo, worker_info
from imagegenx.models import parse_models
from imagegenx.settings import Settings
from tests.service import drop_queues

KEY = "models-key-0123456789"
TWO = {"base": {"engine": "synthetic", "version": "b1"}, "anime": {"engine": "synthetic"}}


def settings(redis_base: str, **kw: Any) -> Settings:
    base = {"broker_url": f"{redis_base}/3", "result_backend": f"{redis_base}/3",
            "queue": f"unit-models-{uuid.uuid4().hex[:8]}", "api_keys": [KEY],
            "workers_inspect_timeout_s": 0.2, "rate_limit": "", "cost_budget_per_minute": 0}
    return Settings(**(base | kw))


@pytest.fixture
def rdb(redis_base: str) -> redis.Redis:
    return redis.Redis.from_url(f"{redis_base}/3")


# -- settings ------------------------------------------------------------------

def test_models_parse_from_compact_text_json_and_yaml_mappings() -> None:
    compact = parse_models("base=/m/sd15, anime=/m/anime.safetensors")
    assert list(compact) == ["base", "anime"]
    assert compact["anime"].path == Path("/m/anime.safetensors")
    js = parse_models(json.dumps({"b": {"path": "/m/b", "version": "2026-11"}, "s": {"engine": "synthetic"}}))
    assert js["b"].version == "2026-11" and js["s"].engine == "synthetic" and js["s"].path is None
    assert parse_models({"x": "/m/x"})["x"].path == Path("/m/x")
    assert parse_models("") == {}


@pytest.mark.parametrize("text, reason", [
    ("base", "'base' is not name=path"),
    ("a=/x,a=/y", "'a' is named twice"),
    ("../up=/x", "is not a model name"),
    ('{"a": {"path": "/x", "colour": 1}}', "colour"),
    ('{"a": ', "not valid JSON"),
])
def test_bad_models_setting_says_what_is_wrong(text: str, reason: str) -> None:
    with pytest.raises((ValueError, ValidationError), match=reason):
        Settings(models=text)


def test_without_models_the_single_model_keeps_the_queue_itself() -> None:
    s = Settings(queue="q", model_name="shapes", model_version="v7")
    assert list(s.served_models) == ["shapes"] and s.default_model == "shapes"
    assert s.queue_for("shapes") == "q" and s.generation_queues == {"shapes": "q"}
    assert s.for_model().model_version == "v7"


def test_each_model_has_its_own_queue_and_worker_settings() -> None:
    s = Settings(queue="q", models=json.dumps(TWO))
    assert s.generation_queues == {"base": "q.base", "anime": "q.anime"}
    w = Settings(queue="q", models=json.dumps(TWO), worker_model="anime").for_model()
    assert (w.served_model_name, w.engine, w.queue_for(w.worker_model)) == ("anime", "synthetic", "q.anime")
    assert s.for_model("base").model_version == "b1"


def test_worker_model_must_be_served_and_diffusion_models_need_a_path() -> None:
    with pytest.raises(ValidationError, match="worker_model 'other' is not served; served models: base, anime"):
        Settings(models=json.dumps(TWO), worker_model="other")
    with pytest.raises(ValidationError, match="'x' runs the diffusion engine and needs a path"):
        Settings(models='{"x": {}}', engine="diffusion")


# -- API -----------------------------------------------------------------------

def test_request_goes_to_its_models_queue_and_names_the_model(redis_base: str, rdb: redis.Redis) -> None:
    s = settings(redis_base, models=json.dumps(TWO))
    client = create_app(s).test_client()
    try:
        assert client.post("/api/v1/images", json={"prompt": "x", "model": "anime"},
                           headers={"X-API-Key": KEY}).status_code == 202
        assert client.post("/api/v1/images", json={"prompt": "x"}, headers={"X-API-Key": KEY}).status_code == 202
        (raw,) = rdb.lrange(f"{s.queue}.anime", 0, -1)
        assert json.loads(_kwargs(raw))["model"] == "anime"
        (raw,) = rdb.lrange(f"{s.queue}.base", 0, -1)  # no model: the first
        assert json.loads(_kwargs(raw))["model"] == "base"
        assert rdb.llen(s.queue) == 0
    finally:
        drop_queues(rdb, s)


def _kwargs(raw: bytes) -> str:
    """The task kwargs of a kombu message on Redis, as JSON text."""
    import base64

    message = json.loads(raw)
    body = json.loads(base64.b64decode(message["body"]))
    return json.dumps(body[1])


def test_unknown_model_is_a_422_listing_the_served_ones(redis_base: str, rdb: redis.Redis) -> None:
    s = settings(redis_base, models=json.dumps(TWO))
    r = create_app(s).test_client().post("/api/v1/images", json={"prompt": "x", "model": "photo"},
                                         headers={"X-API-Key": KEY})
    assert r.status_code == 422
    assert r.json["fields"] == [{"field": "model",
                                 "reason": "unknown model 'photo'; this server serves: base, anime"}]
    assert rdb.llen(f"{s.queue}.base") == rdb.llen(f"{s.queue}.anime") == 0


def test_single_model_messages_stay_as_before(redis_base: str, rdb: redis.Redis) -> None:
    s = settings(redis_base, engine="synthetic", model_name="only")
    client = create_app(s).test_client()
    try:
        assert client.post("/api/v1/images", json={"prompt": "x", "model": "only"},
                           headers={"X-API-Key": KEY}).status_code == 202
        (raw,) = rdb.lrange(s.queue, 0, -1)
        assert json.loads(_kwargs(raw))["model"] is None  # an earlier worker takes it too
    finally:
        drop_queues(rdb, s)


def test_no_live_worker_accepts_up_to_the_limit_then_503(redis_base: str, rdb: redis.Redis) -> None:
    s = settings(redis_base, models=json.dumps(TWO), max_queue_without_worker=2, retry_after_s=9)
    client = create_app(s).test_client()
    try:
        for _ in range(2):
            assert client.post("/api/v1/images", json={"prompt": "x", "model": "anime"},
                               headers={"X-API-Key": KEY}).status_code == 202
        r = client.post("/api/v1/images", json={"prompt": "x", "model": "anime"}, headers={"X-API-Key": KEY})
        assert r.status_code == 503 and r.headers["Retry-After"] == "9"
        assert r.json["error"] == ("model 'anime' has no live worker and 2 requests are already waiting "
                                   "for it (at most 2 are accepted while none is running); retry later")
        assert r.json["model"] == "anime" and rdb.llen(f"{s.queue}.anime") == 2
        # Another model's queue is its own.
        assert client.post("/api/v1/images", json={"prompt": "x", "model": "base"},
                           headers={"X-API-Key": KEY}).status_code == 202
    finally:
        drop_queues(rdb, s)


def test_a_consumed_queue_is_not_refused(redis_base: str, rdb: redis.Redis,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    s = settings(redis_base, models=json.dumps(TWO), max_queue_without_worker=1)
    app = create_app(s)
    celery = app.extensions["imagegenx"].celery

    class Inspect:
        def active_queues(self) -> dict[str, list[dict[str, str]]]:
            return {"gpu0@h": [{"name": f"{s.queue}.anime"}]}

    monkeypatch.setattr(celery.control, "inspect", lambda **_: Inspect())
    client = app.test_client()
    try:
        for _ in range(3):
            assert client.post("/api/v1/images", json={"prompt": "x", "model": "anime"},
                               headers={"X-API-Key": KEY}).status_code == 202
    finally:
        drop_queues(rdb, s)


def test_models_endpoint_lists_models_with_workers_versions_and_depth(
        redis_base: str, rdb: redis.Redis, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "loras" / "ink").mkdir(parents=True)
    (tmp_path / "loras" / "ink" / "ink.safetensors").write_bytes(b"x")
    s = settings(redis_base, models=json.dumps(TWO), lora_dir=str(tmp_path / "loras"))
    workers = [
        worker_info("old@h", {"model": "base", "model_version": "b1", "native_size": [512, 512],
                              "samplers": ["euler", "ddim"], "consuming": [], "max_batch": 8, "max_wait_ms": 50,
                              "buffered_requests": 1, "running_requests": 2}),
        worker_info("new@h", {"model": "base", "model_version": "b2", "native_size": [512, 512],
                              "samplers": ["euler", "ddim"], "consuming": [f"{s.queue}.base"],
                              "max_batch": 8, "max_wait_ms": 50}),
    ]
    monkeypatch.setattr("imagegenx.api.models.live_workers", lambda timeout: workers)
    client = create_app(s).test_client()
    rdb.rpush(f"{s.queue}.anime", "x", "y")
    try:
        assert client.get("/api/v1/models").status_code == 401
        r = client.get("/api/v1/models", headers={"X-API-Key": KEY})
        assert r.status_code == 200, r.json
        base, anime = r.json["models"]
        assert base["name"] == "base" and base["default"] and base["queue"] == f"{s.queue}.base"
        assert base["versions"] == ["b1", "b2"] and base["native_size"] == [512, 512]
        assert base["samplers"] == ["ddim", "euler"] and base["loras"] == ["ink"]
        assert [(w["hostname"], w["consuming"], w["model_version"]) for w in base["workers"]] == [
            ("old@h", False, "b1"), ("new@h", True, "b2")]
        assert anime["queue_depth"] == 2 and anime["workers"] == [] and not anime["default"]
        assert anime["native_size"] is None and "euler" in anime["samplers"]
    finally:
        drop_queues(rdb, s)


def test_worker_info_reads_the_model_fields() -> None:
    w: WorkerInfo = worker_info("w@h", {"model": "m", "model_version": "v", "consuming": ["q.m"],
                                        "max_batch": 4, "max_wait_ms": 50})
    assert (w.model_version, w.consuming) == ("v", ["q.m"])
    assert "model_version" not in (w.batching.model_extra or {})


def test_openapi_names_the_served_models_and_the_models_endpoint(redis_base: str) -> None:
    s = settings(redis_base, models=json.dumps(TWO))
    spec = create_app(s).test_client().get("/api/v1/openapi.json").json
    model = spec["components"]["schemas"]["GenerateRequest"]["properties"]["model"]
    assert model["anyOf"][0]["enum"] == ["base", "anime"] and "default: base" in model["description"]
    assert "ModelsResponse" in spec["components"]["schemas"]
    assert spec["paths"]["/api/v1/models"]["get"]["operationId"] == "listModels"
    assert "model_version" in spec["components"]["schemas"]["GenerateResult"]["properties"]


def test_a_name_that_could_never_be_served_gets_the_same_422(redis_base: str) -> None:
    s = settings(redis_base, models=json.dumps(TWO))
    r = create_app(s).test_client().post("/api/v1/images", json={"prompt": "x", "model": "../etc"},
                                         headers={"X-API-Key": KEY})
    assert r.status_code == 422
    assert r.json["fields"] == [{"field": "model",
                                 "reason": "unknown model '../etc'; this server serves: base, anime"}]


def test_generate_command_names_its_model_option_in_the_422(redis_base: str) -> None:
    from click.testing import CliRunner

    from imagegenx import cli
    from tests.service import ApiServer

    s = settings(redis_base, models=json.dumps(TWO))
    with ApiServer(create_app(s)) as api:
        result = CliRunner().invoke(cli.main, ["generate", "x", "--model", "photo", "--api-url", api.base,
                                               "--api-key", KEY, "--no-wait"])
    assert result.exit_code == 2, result.output
    assert "--model: unknown model 'photo'; this server serves: base, anime" in result.output
