"""Python client of the REST API: submit, wait, follow progress, download.

Only needs ``requests`` and the shared schemas, so applications can use it
without Celery or torch.
"""
from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

from imagegenx.schemas import GenerateResult, SubmitResponse, TaskStatus

READY = ("SUCCESS", "FAILURE", "REVOKED")
FINAL_EVENTS = ("succeeded", "failed", "revoked")
# Answers that mean "this server has no event stream here": follow by polling.
NO_STREAM = (404, 405, 501, 503)


class ApiError(Exception):
    """The API refused a call; ``fields`` lists per-field reasons for 422."""

    def __init__(self, status: int, message: str, fields: list[dict[str, str]] | None = None) -> None:
        detail = "; ".join(f"{f['field']}: {f['reason']}" for f in fields or [])
        super().__init__(f"{status}: {message}" + (f" ({detail})" if detail else ""))
        self.status = status
        self.message = message
        self.fields = fields or []


class TaskFailed(Exception):
    """The task ended in FAILURE or REVOKED."""

    def __init__(self, status: TaskStatus) -> None:
        err = status.error
        super().__init__(f"task {status.task_id} {status.state}: {err.message if err else ''}")
        self.status = status


class EventsUnavailable(Exception):
    """The server does not stream this task's events (an older server, or it is
    unavailable): follow it by polling instead."""


@dataclass
class TaskEvent:
    """One server-sent event of a task: ``status`` is set on the final one."""

    event: str
    data: dict[str, Any]
    id: str | None = None

    @property
    def status(self) -> TaskStatus | None:
        return TaskStatus.model_validate(self.data) if self.event in FINAL_EVENTS else None


def parse_sse(lines: Iterable[str]) -> Iterator[TaskEvent]:
    """Server-sent events from the lines of a ``text/event-stream`` body."""
    fields: dict[str, str] = {}
    data: list[str] = []
    for line in lines:
        if line == "":
            if data:
                try:
                    body = json.loads("\n".join(data))
                except ValueError:
                    body = {"text": "\n".join(data)}
                yield TaskEvent(fields.get("event", "message"), body if isinstance(body, dict)
                                else {"value": body}, fields.get("id"))
            fields, data = {}, []
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "data":
            data.append(value)
        elif name in ("event", "id"):
            fields[name] = value


class Client:
    def __init__(self, base_url: str, api_key: str, timeout: float = 30.0,
                 session: requests.Session | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.session = session or requests.Session()
        self.session.headers["X-API-Key"] = api_key

    def _call(self, method: str, path: str, **kw: Any) -> Any:
        r = self.session.request(method, f"{self.base_url}{path}", timeout=self.timeout, **kw)
        if r.status_code >= 400:
            self._raise(r)
        return r.json()

    def submit(self, prompt: str, *, guidance_interval: Sequence[float] | None = None,
               **params: Any) -> SubmitResponse:
        """Submit a request; ``params`` are GenerateRequest fields. ``guidance_interval``
        (start, end) limits classifier-free guidance to that part of the steps."""
        if guidance_interval is not None:
            params["guidance_interval"] = list(guidance_interval)
        body = {"prompt": prompt, **{k: v for k, v in params.items() if v is not None}}
        return SubmitResponse.model_validate(self._call("POST", "/api/v1/images", json=body))

    def status(self, task_id: str) -> TaskStatus:
        return TaskStatus.model_validate(self._call("GET", f"/api/v1/tasks/{task_id}"))

    def cancel(self, task_id: str) -> TaskStatus:
        return TaskStatus.model_validate(self._call("DELETE", f"/api/v1/tasks/{task_id}"))

    def progress(self, task_id: str, poll_s: float = 0.2,
                 timeout: float | None = None) -> Iterator[TaskStatus]:
        """Yield the task's status each time its state or step changes, until it ends."""
        deadline = None if timeout is None else time.monotonic() + timeout
        last: tuple[str, int | None] | None = None
        while True:
            status = self.status(task_id)
            key = (status.state, status.progress.step if status.progress else None)
            if key != last:
                last = key
                yield status
            if status.state in READY:
                return
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"task {task_id} still {status.state} after {timeout} s")
            time.sleep(poll_s)

    def events(self, task_id: str, timeout: float | None = None,
               read_timeout_s: float = 60.0, reconnects: int = 5) -> Iterator[TaskEvent]:
        """Follow the task through ``GET /api/v1/tasks/<id>/events`` until its final
        event (``succeeded``, ``failed`` or ``revoked``, whose ``status`` is what
        ``status()`` returns). A dropped connection is resumed with
        ``Last-Event-ID``, so no event is missed or repeated. Raises
        EventsUnavailable when the server has no stream for it."""
        deadline = None if timeout is None else time.monotonic() + timeout
        last_id: str | None = None
        failures = 0
        while True:
            headers = {"Accept": "text/event-stream"}
            if last_id is not None:
                headers["Last-Event-ID"] = last_id
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise TimeoutError(f"task {task_id} not finished after {timeout} s")
            read = read_timeout_s if left is None else max(0.1, min(read_timeout_s, left))
            try:
                with self.session.get(f"{self.base_url}/api/v1/tasks/{task_id}/events",
                                      headers=headers, stream=True,
                                      timeout=(self.timeout, read)) as r:
                    if r.status_code == 204:
                        return  # the final event was already delivered
                    if r.status_code in NO_STREAM or (
                            r.status_code == 200 and not r.headers.get("Content-Type", "")
                            .startswith("text/event-stream")):
                        raise EventsUnavailable(f"{r.status_code} from the event stream")
                    if r.status_code >= 400:
                        self._raise(r)
                    for event in parse_sse(r.iter_lines(decode_unicode=True)):
                        failures = 0
                        if event.id is not None:
                            last_id = event.id
                        yield event
                        if event.event in FINAL_EVENTS:
                            return
            except requests.RequestException as exc:
                failures += 1
                if failures > reconnects:
                    raise EventsUnavailable(f"event stream lost: {exc}") from exc
                time.sleep(min(2.0, 0.1 * 2 ** failures))
            # Closed without a final event (the server's stream limit): resume.

    def _raise(self, r: requests.Response) -> None:
        try:
            body = r.json()
        except ValueError:
            body = {"error": r.text[:200]}
        raise ApiError(r.status_code, body.get("error", r.reason), body.get("fields"))

    def follow(self, task_id: str, timeout: float | None = None, poll_s: float = 0.2) -> TaskStatus:
        """The task's final status: from its event stream, else by polling."""
        try:
            for event in self.events(task_id, timeout):
                if event.status is not None:
                    return event.status
            return self.status(task_id)  # 204: it had ended
        except EventsUnavailable:
            pass
        status = None
        for status in self.progress(task_id, poll_s, timeout):
            pass
        assert status is not None
        return status

    def wait(self, task_id: str, timeout: float | None = None, poll_s: float = 0.2) -> GenerateResult:
        status = self.follow(task_id, timeout, poll_s)
        if status.state != "SUCCESS" or status.result is None:
            raise TaskFailed(status)
        return status.result

    def generate(self, prompt: str, timeout: float | None = 300, **params: Any) -> GenerateResult:
        return self.wait(self.submit(prompt, **params).task_id, timeout)

    def download(self, url: str, path: Path | str) -> Path:
        r = self.session.get(url, timeout=self.timeout)
        if r.status_code != 200:
            raise ApiError(r.status_code, f"download of {url} failed")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(r.content)
        return path
