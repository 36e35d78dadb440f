"""The deployment files load and have the structure Kubernetes, KEDA and Compose
require (structural checks: apiVersion/kind, required fields, selectors matching
labels, the GPU request, the scaler's queue; no schema package is installed)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from imagegenx.settings import Settings

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
KINDS = {("apps/v1", "Deployment"), ("v1", "Service"), ("keda.sh/v1alpha1", "ScaledObject")}


def _docs() -> list[dict[str, Any]]:
    docs = [d for p in sorted((DEPLOY / "k8s").glob("*.yaml"))
            for d in yaml.safe_load_all(p.read_text()) if d]
    assert docs
    return docs


def test_every_manifest_is_a_known_kind_with_its_required_fields() -> None:
    docs = _docs()
    for d in docs:
        assert (d["apiVersion"], d["kind"]) in KINDS, d
        assert d["metadata"]["name"]
        spec = d["spec"]
        if d["kind"] == "Deployment":
            labels = spec["template"]["metadata"]["labels"]
            assert spec["selector"]["matchLabels"].items() <= labels.items()
            for c in spec["template"]["spec"]["containers"]:
                assert c["name"] and c["image"]
        elif d["kind"] == "Service":
            assert spec["selector"] and all("port" in p for p in spec["ports"])
    by = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    worker = by[("Deployment", "imagegenx-worker")]["spec"]["template"]["spec"]["containers"][0]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    scaled = by[("ScaledObject", "imagegenx-worker")]["spec"]
    assert ("Deployment", scaled["scaleTargetRef"]["name"]) in by
    (trigger,) = scaled["triggers"]
    assert trigger["type"] == "redis" and trigger["metadata"]["listName"] == Settings().queue
    assert int(trigger["metadata"]["listLength"]) > 0


def test_compose_file_has_redis_api_workers_per_gpu_and_flower() -> None:
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"redis", "api", "flower"} <= services.keys()
    workers = [s for name, s in services.items() if name.startswith("worker-")]
    gpus = [dev for w in workers for dev in w["deploy"]["resources"]["reservations"]["devices"]]
    assert len(workers) >= 1 and sorted(d["device_ids"][0] for d in gpus) == [
        str(i) for i in range(len(workers))]
    for s in services.values():
        assert "image" in s
    for w in workers:  # a worker that lost its GPU exits (status 70) to be started again
        assert w["restart"] == "unless-stopped"
    assert services["api"]["environment"]["IMAGEGENX_BROKER_URL"] == "redis://redis:6379/0"
