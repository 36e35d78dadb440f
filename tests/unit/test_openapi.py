"""The OpenAPI document is valid and carries this server's limits."""
from __future__ import annotations

from openapi_spec_validator import validate

from imagegenx.api import create_app
from imagegenx.settings import Settings


def test_spec_is_valid_openapi_with_server_limits(redis_base: str) -> None:
    settings = Settings(broker_url=f"{redis_base}/3", result_backend=f"{redis_base}/3",
                        max_steps=50, max_size=768)
    spec = create_app(settings).test_client().get("/api/v1/openapi.json").json
    validate(spec)
    props = spec["components"]["schemas"]["GenerateRequest"]["properties"]
    assert props["steps"]["maximum"] == 50
    assert props["width"]["anyOf"][0]["maximum"] == 768
    assert set(spec["paths"]) >= {"/api/v1/images", "/api/v1/tasks/{task_id}", "/api/v1/files/{key}"}


def test_the_document_names_the_served_loras() -> None:
    from imagegenx.api.openapi import build_spec
    from imagegenx.schemas import Limits

    def lora(names: list[str] | None) -> dict:  # type: ignore[type-arg]
        return build_spec(Limits(), names)["components"]["schemas"]["GenerateRequest"]["properties"]["lora"]

    served = lora(["style", "toon"])
    assert served["anyOf"][0]["enum"] == ["style", "toon"]
    assert served["anyOf"][1]["items"]["enum"] == ["style", "toon"]
    assert lora([])["type"] == "null"  # none served: a request may not name one
    assert "enum" not in lora(None)["anyOf"][0]  # unknown (no catalogue given): the name pattern only


def test_the_document_bounds_the_guidance_interval() -> None:
    from imagegenx.api.openapi import build_spec
    from imagegenx.schemas import Limits

    spec = build_spec(Limits(guidance_interval=(0.0, 0.4)), None)
    prop = spec["components"]["schemas"]["GenerateRequest"]["properties"]["guidance_interval"]
    items = prop["anyOf"][0]
    assert items["minItems"] == items["maxItems"] == 2
    assert all(i["minimum"] == 0 and i["maximum"] == 1 for i in items["prefixItems"])
    assert "(0, 0.4 on this server)" in prop["description"]
