"""The API process holds none of the worker's code: no ``workers``, no ``tasks``
(which would pull in the bootsteps, the runtime and the pipeline), no torch."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_creating_and_using_the_api_imports_no_worker_module() -> None:
    code = """
import json, sys
from imagegenx.api import create_app
from imagegenx.settings import Settings
app = create_app(Settings(api_keys=["k"], rate_limit="", status_rate_limit=""))
client = app.test_client()
client.get("/healthz")
client.get("/api/v1/openapi.json")
client.post("/api/v1/images", json={"prompt": "x"}, headers={"X-API-Key": "k"})
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in ("workers", "tasks", "torch"))))
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         timeout=120, check=True)
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    assert loaded == [], loaded


def test_the_worker_queues_webhooks_without_importing_tasks(redis_base: str) -> None:
    code = f"""
import json, sys
from types import SimpleNamespace
from imagegenx.settings import Settings
from workers.callbacks import notify
sent = []
class App:
    imagegenx_settings = Settings(broker_url="{redis_base}/3", result_backend="{redis_base}/3")
    def send_task(self, name, kwargs, queue):
        sent.append((name, queue, kwargs["url"]))
req = SimpleNamespace(id="imports-test", kwargs={{"callback_url": "https://example.com/hook"}},
                      task=SimpleNamespace(app=App()))
notify(req, "SUCCESS", result={{"images": []}})
print(json.dumps({{"sent": sent, "tasks": sorted(m for m in sys.modules if m.split(".")[0] == "tasks")}}))
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         timeout=120, check=True)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got == {"sent": [["imagegenx.deliver_webhook", "imagegenx.webhooks", "https://example.com/hook"]],
                   "tasks": []}, (got, out.stderr[-2000:])
