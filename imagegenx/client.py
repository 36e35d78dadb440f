"""Python client of the REST API: submit, wait, follow progress, download.

Only needs ``requests`` and the shared schemas, so applications can use it
without Celery or torch.
"""
from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import requests

from imagegenx.schemas import GenerateResult, SubmitResponse, TaskStatus

READY = ("SUCCESS", "FAILURE", "REVOKED")


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
            try:
                body = r.json()
            except ValueError:
                body = {"error": r.text[:200]}
            raise ApiError(r.status_code, body.get("error", r.reason), body.get("fields"))
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

    def wait(self, task_id: str, timeout: float | None = None, poll_s: float = 0.2) -> GenerateResult:
        status = None
        for status in self.progress(task_id, poll_s, timeout):
            pass
        assert status is not None
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
