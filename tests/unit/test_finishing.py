"""The pipeline's two phases (engine, then render/store) and the finishing
thread: the next batch's engine run overlaps the previous batch's storing,
the hand-over is bounded, and every request is still stored and acknowledged."""
from __future__ import annotations

import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from PIL import Image

from imagegenx.batching import Batch
from imagegenx.engine.base import BatchSpec, StepCallback
from imagegenx.engine.synthetic import SyntheticEngine
from imagegenx.pipeline import BatchPipeline
from imagegenx.request_state import RequestState
from imagegenx.schemas import GenerateRequest
from imagegenx.storage import LocalStorage
from workers.executor import BatchExecutor
from workers.finisher import Finisher


def states(*prompts: str, images: int = 1, prefix: str = "j") -> list[RequestState]:
    return [RequestState(f"{prefix}{i}", GenerateRequest(prompt=p, seed=i, width=64, height=64,
                                                         steps=2, num_images=images))
            for i, p in enumerate(prompts)]


class Events:
    """Thread-safe, ordered record of what happened."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.log: list[tuple[str, str]] = []

    def add(self, kind: str, what: str) -> None:
        with self._lock:
            self.log.append((kind, what))

    def index(self, kind: str, what: str) -> int:
        return self.log.index((kind, what))


class RecordingEngine:
    """Synthetic pictures; records when each engine call starts and ends."""

    name = "recording"
    native_size = (64, 64)
    samplers = ("euler",)

    def __init__(self, events: Events | None = None, seconds: float = 0.0) -> None:
        self.inner = SyntheticEngine()
        self.events = events or Events()
        self.seconds = seconds
        self.calls = 0

    def generate(self, spec: BatchSpec, on_step: StepCallback | None = None) -> list[Image.Image | None]:
        self.calls += 1
        first = spec.samples[0].prompt
        self.events.add("engine-start", first)
        time.sleep(self.seconds)
        out = self.inner.generate(spec, on_step)
        self.events.add("engine-end", first)
        return out


class Storage:
    """In memory; optionally slow, or failing for keys under one prefix."""

    def __init__(self, events: Events | None = None, delay_s: float = 0.0, fail: str = "") -> None:
        self.files: dict[str, bytes] = {}
        self.events = events or Events()
        self.delay_s = delay_s
        self.fail = fail

    def put(self, key: str, data: bytes, content_type: str = "image/png") -> None:
        if self.fail and key.startswith(self.fail):
            raise OSError(f"disk full writing {key}")
        time.sleep(self.delay_s)
        self.files[key] = data
        self.events.add("put", key)


def comparable(outcomes: dict[str, Any]) -> dict[str, Any]:
    """Outcomes without what differs between runs (batch ids, timings)."""
    out = {}
    for state_id, o in outcomes.items():
        if o.result is None:
            out[state_id] = (o.dropped, str(o.error))
            continue
        r = o.result.model_dump()
        r["batch"].pop("id")
        assert set(r.pop("timings")) == {"queued_s", "engine_s", "postprocess_s"}
        out[state_id] = r
    return out


# -- the pipeline's phases ---------------------------------------------------
def test_draw_then_finish_equals_run(tmp_path: Path) -> None:
    a = BatchPipeline(SyntheticEngine(faults="raise:POISON"), LocalStorage(tmp_path / "a"), "http://x", "m")
    b = BatchPipeline(SyntheticEngine(faults="raise:POISON"), LocalStorage(tmp_path / "b"), "http://x", "m")
    batch = states("a", "POISON b", "c", images=2)
    output = b.draw(batch)
    assert [state.id for state, _ in output.drawn_requests()] == ["j0", "j2"]
    assert set(output.outcomes) == {"j0", "j1", "j2"} and not output.outcomes["j1"].drawn
    assert not list((tmp_path / "b").rglob("*.png"))  # nothing stored before finish
    split = b.finish(output)
    whole = a.run(batch)
    assert list(split) == list(whole) == ["j0", "j1", "j2"]
    assert comparable(split) == comparable(whole)
    assert "injected fault" in str(split["j1"].error)
    for path in (tmp_path / "a").rglob("*.png"):
        assert (tmp_path / "b" / path.relative_to(tmp_path / "a")).read_bytes() == path.read_bytes()


def test_a_storage_failure_fails_only_its_job_and_the_engine_runs_once() -> None:
    engine = RecordingEngine()
    storage = Storage(fail="j1/")
    out = BatchPipeline(engine, storage, "http://x", "m").run(states("a", "b", "c"))  # type: ignore[arg-type]
    assert engine.calls == 1
    assert "disk full" in str(out["j1"].error) and out["j1"].result is None
    assert out["j0"].result is not None and out["j2"].result is not None
    assert out["j0"].result.batch.size == 3
    assert sorted(storage.files) == ["j0/0.png", "j0/0.thumb.png", "j2/0.png", "j2/0.thumb.png"]


def test_prepared_images_are_the_ones_stored() -> None:
    class Doubling(BatchPipeline):
        def _prepare_images(self, state: RequestState, images: list[Image.Image]) -> list[Image.Image]:
            if state.id == "j1":
                raise RuntimeError("upscaler broke")
            return [im.resize((im.width * 2, im.height * 2)) for im in images]

    engine = RecordingEngine()
    out = Doubling(engine, Storage(), "http://x", "m").run(states("a", "b"))  # type: ignore[arg-type]
    assert engine.calls == 1
    assert out["j0"].result is not None and out["j0"].result.images[0].width == 128
    assert "upscaler broke" in str(out["j1"].error)


# -- the finishing thread ----------------------------------------------------
def test_the_hand_over_is_bounded_and_drains() -> None:
    release = threading.Event()
    done: list[int] = []
    finisher: Finisher[int] = Finisher(lambda n: (release.wait(5), done.append(n)), backlog=1)
    finisher.submit(1)  # being finished
    finisher.submit(2)  # waits
    third = threading.Thread(target=finisher.submit, args=(3,))
    third.start()
    third.join(0.3)
    assert third.is_alive()  # blocked: the finisher is a batch behind
    assert finisher.items() == [1, 2]
    assert not finisher.drain(0.05)
    release.set()
    third.join(5)
    assert finisher.drain(5) and finisher.close(5)
    assert done == [1, 2, 3] and finisher.items() == []
    finisher.submit(4)  # after close: finished in the caller's thread
    assert done == [1, 2, 3, 4]


class Backend:
    def __init__(self, events: Events) -> None:
        self.events = events
        self.states: dict[str, str] = {}

    def store_result(self, task_id: str, result: Any, state: str, request: Any = None) -> None:
        self.states[task_id] = state

    def mark_as_done(self, task_id: str, result: Any, request: Any = None) -> None:
        self.states[task_id] = "SUCCESS"
        self.events.add("done", task_id)

    def mark_as_failure(self, task_id: str, exc: BaseException, traceback: str = "",
                        request: Any = None) -> None:
        self.states[task_id] = "FAILURE"
        self.events.add("failed", task_id)


class FakeRequest:
    """What the executor uses of a Celery request."""

    name = "imagegenx.generate"
    hostname = "test@host"
    kwargs: dict[str, Any] = {}
    _context = None
    _already_revoked = False

    def __init__(self, task_id: str, backend: Backend) -> None:
        self.id = task_id
        self.task = SimpleNamespace(backend=backend)
        self.time_start: float | None = None
        self.worker_pid: int | None = None
        self.acked = False

    def revoked(self) -> bool:
        return False

    def send_event(self, *args: Any, **kwargs: Any) -> None:
        pass

    def acknowledge(self) -> None:
        self.acked = True
        self.task.backend.events.add("ack", self.id)


class RevocableRequest(FakeRequest):
    """Revoked once its id is in the worker's revoked set, as Celery's Request:
    marks REVOKED, acknowledges, and remembers it."""

    def revoked(self) -> bool:
        from celery.worker import state as worker_state

        if self.id not in worker_state.revoked:
            return False
        self._already_revoked = True
        self.task.backend.store_result(self.id, None, "REVOKED")
        self.acknowledge()
        return True


def batch_of(states: list[RequestState], backend: Backend,
             request: type[FakeRequest] = FakeRequest) -> Batch[RequestState]:
    for s in states:
        s.delivery = request(s.id, backend)
    return Batch("k", states, sum(s.images for s in states))


def slow_storage_executor() -> tuple[Events, Backend, BatchExecutor]:
    """An executor whose engine runs take 0.05 s and each stored file 0.1 s."""
    events = Events()
    engine = RecordingEngine(events, seconds=0.05)
    storage = Storage(events, delay_s=0.1)
    pipeline = BatchPipeline(engine, storage, "http://x", "m")  # type: ignore[arg-type]
    return events, Backend(events), BatchExecutor(lambda: pipeline, progress_interval_s=60.0)


def test_the_next_engine_run_overlaps_the_previous_batch_s_finishing() -> None:
    events, backend, executor = slow_storage_executor()
    batches = [batch_of(states("x", "y", prefix=f"b{n}-"), backend) for n in range(3)]
    for b in batches:  # as the model thread does
        executor(b)
    assert executor.close(30)
    starts = [i for i, (kind, _) in enumerate(events.log) if kind == "engine-start"]
    assert len(starts) == 3
    for n in (0, 1):  # batch n+1's engine run started before batch n's last file was stored
        assert starts[n + 1] < events.index("put", f"b{n}-1/0.thumb.png")
    ids = [e.delivery.id for b in batches for e in b.items]
    assert all(backend.states[i] == "SUCCESS" for i in ids)
    assert all(e.delivery.acked for b in batches for e in b.items)  # type: ignore[attr-defined]
    for i in ids:  # acknowledged only after the result is stored
        assert events.index("done", i) < events.index("ack", i)
    assert executor.stats.batches == 3 and executor.stats.succeeded == 6
    assert executor.finishing() == []


def test_a_suspect_starts_only_after_the_batches_before_it_are_acknowledged() -> None:
    """A request that ran on a lost worker may be what kills workers: the requests
    drawn before it are stored and acknowledged before it starts, so that if it
    kills this process too they are not delivered (and run) once more."""
    events, backend, executor = slow_storage_executor()
    first = batch_of(states("x", "y", prefix="b0-"), backend)
    suspect = batch_of(states("z", prefix="s-"), backend)
    suspect.items[0].suspect = True
    executor(first)
    executor(suspect)
    assert executor.close(30)
    starts = [i for i, (kind, _) in enumerate(events.log) if kind == "engine-start"]
    assert len(starts) == 2
    for e in first.items:  # the earlier batch was acknowledged before the suspect's run began
        assert events.index("ack", e.id) < starts[1]
    assert backend.states["s-0"] == "SUCCESS"


def test_a_broken_finish_still_reports_every_request() -> None:
    events = Events()
    pipeline = BatchPipeline(RecordingEngine(events), Storage(events), "http://x", "m")  # type: ignore[arg-type]

    def broken(output: Any) -> Any:
        raise RuntimeError("render pool gone")

    pipeline.finish = broken  # type: ignore[method-assign]
    backend = Backend(events)
    executor = BatchExecutor(lambda: pipeline, progress_interval_s=60.0)
    batch = batch_of(states("a", "b"), backend)
    executor(batch)
    assert executor.drain(10)
    assert backend.states == {"j0": "FAILURE", "j1": "FAILURE"}
    assert all(e.delivery.acked for e in batch.items)  # type: ignore[attr-defined]
    executor.close(5)


def test_a_request_revoked_while_its_batch_waits_to_be_finished_ends_revoked() -> None:
    from celery.worker import state as worker_state

    events = Events()
    pipeline = BatchPipeline(RecordingEngine(events), Storage(events), "http://x", "m")  # type: ignore[arg-type]
    backend = Backend(events)

    executor = BatchExecutor(lambda: pipeline, progress_interval_s=60.0)
    batch = batch_of(states("a", "b", prefix="rv-"), backend, RevocableRequest)
    finish = pipeline.finish

    def revoke_first_then_finish(output: Any) -> Any:  # the revoke arrives after the engine ran
        worker_state.revoked.add("rv-0")
        return finish(output)

    pipeline.finish = revoke_first_then_finish  # type: ignore[method-assign]
    try:
        executor(batch)
        assert executor.close(10)
    finally:
        worker_state.revoked.discard("rv-0")
    assert backend.states == {"rv-0": "REVOKED", "rv-1": "SUCCESS"}
    assert all(e.delivery.acked for e in batch.items)  # type: ignore[attr-defined]
    assert executor.stats.revoked == 1 and executor.stats.succeeded == 1


def test_a_request_revoked_mid_run_stays_revoked_when_its_batch_is_retried_in_halves() -> None:
    """A batch that fails after one of its requests was revoked is bisected; the
    retry must drop that request again, not draw it and store SUCCESS over REVOKED."""
    from celery.worker import state as worker_state

    events = Events()
    backend = Backend(events)

    class RevokeThenFail(RecordingEngine):
        def generate(self, spec: BatchSpec, on_step: StepCallback | None = None) -> list[Image.Image | None]:
            self.calls += 1
            if self.calls == 1:
                assert on_step is not None
                on_step(0, 2)
                worker_state.revoked.add("rb-0")  # the user revokes during the first step
                assert list(on_step(1, 2)) == [0]
                raise RuntimeError("the latents of one request are NaN")  # a request's own failure
            return self.inner.generate(spec, on_step)

    engine = RevokeThenFail(events)
    storage = Storage(events)
    pipeline = BatchPipeline(engine, storage, "http://x", "m")  # type: ignore[arg-type]
    executor = BatchExecutor(lambda: pipeline, progress_interval_s=60.0)
    try:
        executor(batch_of(states("a", "b", prefix="rb-"), backend, RevocableRequest))
        assert executor.close(10)
    finally:
        worker_state.revoked.discard("rb-0")
    assert backend.states == {"rb-0": "REVOKED", "rb-1": "SUCCESS"}
    assert executor.stats.revoked == 1 and executor.stats.succeeded == 1
    assert not any(key.startswith("rb-0/") for key in storage.files)  # not drawn again
