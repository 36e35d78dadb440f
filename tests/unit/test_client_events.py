"""The Python client follows a task through its event stream, resumes a dropped
stream with Last-Event-ID, and falls back to polling when the server has no
stream (a threaded HTTP server on 127.0.0.1 plays the API)."""
from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from imagegenx.client import Client

TASK = "0b5f3c1e-2a4d-4e6f-8a9b-0c1d2e3f4a5b"
STATUS = {"task_id": TASK, "state": "SUCCESS", "progress": {"step": 2, "total": 2},
          "result": {"images": [{"url": "http://x/0.png", "thumbnail_url": "http://x/t.png",
                                 "seed": 1, "width": 64, "height": 64}],
                     "batch": {"id": "b", "size": 1, "requests": 1}, "timings": {},
                     "model": "m", "sampler": "euler", "steps": 2},
          "error": None, "webhook": None}
EVENTS = [("1-0", "started", {"hostname": "w"}), ("2-0", "progress", {"step": 1, "total": 2}),
          ("3-0", "progress", {"step": 2, "total": 2}), ("4-0", "succeeded", STATUS)]


class FakeApi:
    """``stream``: serve the events (the first connection drops after two);
    otherwise the events path answers 404, as a server without streams does."""

    def __init__(self, stream: bool) -> None:
        self.seen: list[dict[str, Any]] = []
        self.stream = stream
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"

            def do_GET(self) -> None:  # noqa: N802
                outer.seen.append({"path": self.path, "last": self.headers.get("Last-Event-ID")})
                if self.path.endswith("/events"):
                    if not stream:
                        return self._json(404, {"error": "not found"})
                    last = self.headers.get("Last-Event-ID")
                    rest = [e for e in EVENTS if last is None or e[0] > last]
                    if last is None:
                        rest = rest[:2]  # the connection drops here
                    self.send_response(200)
                    self.send_header("Content-Type", "text/event-stream")
                    self.end_headers()
                    for eid, name, data in rest:
                        self.wfile.write(f"id: {eid}\nevent: {name}\ndata: {json.dumps(data)}\n\n"
                                         .encode())
                    return None
                return self._json(200, STATUS)

            def _json(self, status: int, body: dict[str, Any]) -> None:
                raw = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(params=[True, False], ids=["stream", "no-stream"])
def api(request: pytest.FixtureRequest) -> Iterator[FakeApi]:
    server = FakeApi(request.param)
    yield server
    server.close()


def test_wait_follows_the_stream_or_polls(api: FakeApi) -> None:
    result = Client(api.base, "k").wait(TASK, timeout=10)
    assert result.images[0].seed == 1
    events, status = f"/api/v1/tasks/{TASK}/events", f"/api/v1/tasks/{TASK}"
    if api.stream:  # the dropped connection was resumed after the last id received
        assert [(s["path"], s["last"]) for s in api.seen] == [(events, None), (events, "2-0")]
    else:  # 404 from the stream: polled once, it had ended
        assert [s["path"] for s in api.seen] == [events, status]


def test_events_resume_without_gaps_or_repeats() -> None:
    server = FakeApi(stream=True)
    try:
        events = list(Client(server.base, "k").events(TASK, timeout=10))
    finally:
        server.close()
    assert [(e.id, e.event) for e in events] == [(eid, name) for eid, name, _ in EVENTS]
    final = events[-1].status
    assert final is not None and final.state == "SUCCESS"
