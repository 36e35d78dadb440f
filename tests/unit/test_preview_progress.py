"""Previews in the step loop's progress: only the requests that asked, at their due
steps, encoded off the model thread, and kept in every later PROGRESS."""
from __future__ import annotations

import threading
from typing import Any

from imagegenx.engine.base import BatchSpec, Sample
from imagegenx.engine.synthetic import SyntheticEngine
from imagegenx.request_state import RequestState
from imagegenx.schemas import GenerateRequest
from workers.executor import BatchExecutor


class Backend:
    def __init__(self) -> None:
        self.stored: list[tuple[str, dict[str, Any], str, str]] = []
        self.lock = threading.Lock()

    def store_result(self, task_id: str, result: Any, state: str, request: Any = None) -> None:
        with self.lock:
            self.stored.append((task_id, result, state, threading.current_thread().name))


class Req:
    def __init__(self, task_id: str, backend: Backend) -> None:
        self.id = task_id
        self.task = type("T", (), {"backend": backend})()
        self._context = None


class CountingEngine(SyntheticEngine):
    def __init__(self) -> None:
        super().__init__()
        self.preview_rows: list[int] = []

    def preview(self, states):  # type: ignore[no-untyped-def]
        self.preview_rows.append(sum(s.rows for s in states))
        return super().preview(states)


def request_state(engine: SyntheticEngine, backend: Backend, name: str, steps: int, preview: int | None,
          images: int = 1) -> RequestState:
    body: dict[str, Any] = {"prompt": name, "seed": 1, "width": 64, "height": 64, "steps": steps,
                            "num_images": images}
    if preview:
        body["preview"] = {"every": preview}
    e = RequestState(name, GenerateRequest.model_validate(body), delivery=Req(name, backend))
    e.denoising = engine.begin(BatchSpec(64, 64, steps, "euler",
                                         tuple(Sample(name, 1 + i) for i in range(images))))
    return e


def run(executor: BatchExecutor, engine: SyntheticEngine, states: list[RequestState], steps: int,
        clock: list[float]) -> None:
    for _ in range(steps):
        engine.step([e.denoising for e in states if not e.denoising.done])
        clock[0] += 0.1
        executor.progress(states, clock[0], engine)
        assert executor._preview_pool.submit(lambda: None).result(5) is None  # let the thread catch up


def test_previews_only_for_the_rows_that_asked_at_their_steps() -> None:
    backend, engine = Backend(), CountingEngine()
    executor = BatchExecutor(lambda: None, progress_interval_s=0.0)  # type: ignore[arg-type,return-value]
    try:
        a = request_state(engine, backend, "a", 10, preview=3, images=2)
        b = request_state(engine, backend, "b", 10, preview=None)
        run(executor, engine, [a, b], 10, [0.0])
    finally:
        executor.close(5)
    assert engine.preview_rows == [2, 2, 2]  # steps 3, 6, 9; only a's two rows
    a_meta = [m for t, m, s, _ in backend.stored if t == "a"]
    assert [m["preview"]["step"] for m in a_meta if "preview" in m] == [3, 3, 3, 6, 6, 6, 9]
    assert [m["step"] for m in a_meta] == list(range(1, 10))  # no PROGRESS at the last step
    first = next(m for m in a_meta if "preview" in m)["preview"]
    assert (first["width"], first["height"]) == (2 * 64, 64)  # a's two images side by side
    # Stored with a preview by the preview thread, the rest by the caller's thread.
    threads = {("preview" in m and m["preview"]["step"] == m["step"], th.startswith("imagegenx-preview"))
               for t, m, _, th in backend.stored if t == "a"}
    assert threads == {(True, True), (False, False)}
    assert all("preview" not in m for t, m, _, _ in backend.stored if t == "b")


def test_a_due_preview_waits_for_the_progress_interval_instead_of_being_dropped() -> None:
    backend, engine = Backend(), CountingEngine()
    executor = BatchExecutor(lambda: None, progress_interval_s=0.25)  # type: ignore[arg-type,return-value]
    try:
        a = request_state(engine, backend, "a", 12, preview=2)
        run(executor, engine, [a], 12, [0.0])  # 0.1 s a step: progress at steps 1, 4, 7, 10
    finally:
        executor.close(5)
    stored = [m for _, m, _, _ in backend.stored]
    assert [m["step"] for m in stored] == [1, 4, 7, 10]
    assert [m.get("preview", {}).get("step") for m in stored] == [None, 4, 7, 10]
