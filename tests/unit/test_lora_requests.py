"""LoRA request fields: 422 naming the field, names checked against lora_dir,
and the LoRA set in the batch key and the engine batch. No torch, no worker."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from flask.testing import FlaskClient

from imagegenx.api import create_app
from imagegenx.lora_catalog import LoraCatalog, LoraNotFound
from imagegenx.pipeline import batch_key, plan
from imagegenx.request_state import RequestState
from imagegenx.schemas import GenerateRequest
from imagegenx.settings import Settings
from tests.service import drop_queues

KEY = "unit-lora-key"


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("loras")
    for name in ("anime", "ink.v2"):
        (root / name).mkdir()
        (root / name / "pytorch_lora_weights.safetensors").write_bytes(b"")
    (root / "empty").mkdir()  # no weights file: not a LoRA
    return root


@pytest.fixture(scope="module")
def client(redis_base: str, lora_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FlaskClient]:
    settings = Settings(broker_url=f"{redis_base}/3", result_backend=f"{redis_base}/3",
                        queue="unit-lora", api_keys=[KEY], rate_limit="", lora_dir=lora_dir,
                        storage_root=tmp_path_factory.mktemp("files"))
    yield create_app(settings).test_client()
    drop_queues(redis.Redis.from_url(settings.broker_url), settings)


def reasons(client: FlaskClient, **fields: object) -> dict[str, str]:
    r = client.post("/api/v1/images", json={"prompt": "x", **fields}, headers={"X-API-Key": KEY})
    assert r.status_code == 422, r.json
    return {f["field"]: f["reason"] for f in r.json["fields"]}


@pytest.mark.parametrize(("fields", "field", "reason"), [
    ({"lora": "nope"}, "lora", "unknown LoRA 'nope' in lora_dir"),
    ({"lora": ["anime", "nope"]}, "lora", "available: anime, ink.v2"),
    ({"lora": "empty"}, "lora", "unknown LoRA 'empty'"),
    ({"lora": "../etc"}, "lora", "is not a LoRA name"),
    ({"lora": ".hidden"}, "lora", "is not a LoRA name"),
    ({"lora": ["a/b"]}, "lora", "is not a LoRA name"),
    ({"lora": ["anime", "anime"]}, "lora", "named twice"),
    ({"lora": ["a", "b", "c", "d", "e"]}, "lora", "at most 4"),
    ({"lora": 3}, "lora", "a LoRA name or a list of names"),
    ({"lora": ["anime", "ink.v2"], "lora_weight": [0.5]}, "lora_weight", "lists 1 weights but lora names 2"),
    ({"lora": "anime", "lora_weight": [0.5, 1]}, "lora_weight", "lists 2 weights but lora names 1"),
    ({"lora_weight": [1]}, "lora_weight", "lora names 0"),
    ({"lora": "anime", "lora_weight": 2.5}, "lora_weight", "between -2 and 2"),
    ({"lora": ["anime"], "lora_weight": [-3]}, "lora_weight", "between -2 and 2"),
    ({"lora": "anime", "lora_weight": True}, "lora_weight", "must be a number"),
    ({"lora": "anime", "lora_weight": "1"}, "lora_weight", "must be a number"),
])
def test_bad_lora_fields_are_422_naming_the_field(client: FlaskClient, fields: dict, field: str,
                                                   reason: str) -> None:
    assert reason in reasons(client, **fields)[field]


def test_known_names_are_accepted(client: FlaskClient) -> None:
    r = client.post("/api/v1/images", headers={"X-API-Key": KEY},
                    json={"prompt": "x", "lora": ["ink.v2", "anime"], "lora_weight": [0.5, -1]})
    assert r.status_code == 202, r.json


def test_without_the_folder_no_lora_is_available(tmp_path: Path) -> None:
    catalog = LoraCatalog(tmp_path / "absent")
    assert not catalog.exists() and catalog.names() == []
    with pytest.raises(LoraNotFound, match=r"^unknown LoRA 'anime': no LoRA is available "
                                           r"\(lora_dir .*absent does not exist\)$"):
        catalog.require(["anime"])


def test_api_without_the_folder_refuses_any_lora(redis_base: str, tmp_path: Path) -> None:
    settings = Settings(broker_url=f"{redis_base}/3", result_backend=f"{redis_base}/3",
                        queue="unit-lora-absent", api_keys=[KEY], rate_limit="",
                        lora_dir=tmp_path / "absent", storage_root=tmp_path / "files")
    client = create_app(settings).test_client()
    assert reasons(client, lora="anime") == {
        "lora": f"unknown LoRA 'anime': no LoRA is available (lora_dir {tmp_path / 'absent'} does not exist)"}
    ok = client.post("/api/v1/images", json={"prompt": "x"}, headers={"X-API-Key": KEY})
    assert ok.status_code == 202, ok.json  # no LoRA named: the folder does not matter
    drop_queues(redis.Redis.from_url(settings.broker_url), settings)


def test_weights_file_prefers_the_diffusers_name(tmp_path: Path) -> None:
    (tmp_path / "x").mkdir()
    for name in ("a.safetensors", "pytorch_lora_weights.safetensors"):
        (tmp_path / "x" / name).write_bytes(b"")
    assert LoraCatalog(tmp_path).weights_file("x").name == "pytorch_lora_weights.safetensors"
    (tmp_path / "x" / "pytorch_lora_weights.safetensors").unlink()
    (tmp_path / "x" / "b.safetensors").write_bytes(b"")
    with pytest.raises(LoraNotFound, match="several"):
        LoraCatalog(tmp_path).weights_file("x")


def resolved(**fields: object) -> GenerateRequest:
    return GenerateRequest(prompt="p", width=64, height=64, seed=1, **fields)  # type: ignore[arg-type]


def test_lora_sets_are_part_of_the_batch_key() -> None:
    base = batch_key(resolved(), "m")
    anime = batch_key(resolved(lora="anime"), "m")
    assert anime != base and anime.loras == (("anime", 1.0),)
    assert batch_key(resolved(lora="anime", lora_weight=0.5), "m") != anime
    assert batch_key(resolved(lora=["anime", "ink"]), "m") != anime
    # Same set, however written: one key.
    assert (batch_key(resolved(lora=["ink", "anime"], lora_weight=[0.5, 1]), "m")
            == batch_key(resolved(lora=["anime", "ink"], lora_weight=[1.0, 0.5]), "m"))
    assert batch_key(resolved(lora="anime", lora_weight=0), "m") == base  # weight 0: the base model
    assert batch_key(resolved(lora=[]), "m") == base


def test_plan_carries_the_set_into_the_engine_batch() -> None:
    spec, _ = plan([RequestState("a", resolved(lora=["ink", "anime"], lora_weight=[-0.5, 1]))])
    assert spec.loras == (("anime", 1.0), ("ink", -0.5))
    assert plan([RequestState("b", resolved())])[0].loras == ()


def test_catalog_reads_the_folder_only_for_named_loras_and_reports_unreadable_ones(tmp_path: Path) -> None:
    from imagegenx.lora_catalog import LoraCatalog, LoraNotFound

    class Unreadable(LoraCatalog):
        def names(self) -> list[str]:
            raise PermissionError(13, "Permission denied")

    catalog = Unreadable(tmp_path)
    catalog.require([])  # no LoRA named: the folder is not read
    with pytest.raises(LoraNotFound, match="cannot read lora_dir .*Permission denied"):
        catalog.require(["style"])
