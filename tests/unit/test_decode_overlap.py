"""The step loop with decodes the device runs while the next UNet calls are queued
(``start_decode``, the engine's decode stream): the other requests keep stepping
meanwhile, a finished request counts no rows while it decodes and leaves once its
images are collected, a row that did not decode fails alone, a decode that breaks
as a whole is retried once per request, a draining worker waits for the decodes,
a lost device gives the decoding requests back with the others, an out-of-memory
call beside a decode runs again once it ended, and a hand-over that breaks fails
its requests instead of leaving them decoding; decodes are handed over in the
order they end."""
from __future__ import annotations

import time
from typing import Any

import pytest
import torch

from imagegenx.engine.base import BatchSpec, DecodedNow, start_decode
from imagegenx.engine.synthetic import SyntheticDenoising as Trajectory
from imagegenx.errors import DeviceLost
from imagegenx.pipeline import StepOutput
from imagegenx.request_state import RequestState
from imagegenx.schemas import GenerateRequest
from imagegenx.step_scheduler import StepScheduler
from workers.executor import BatchExecutor
from workers.model_thread import WorkerState
from workers.step_runner import StepRunner


class Pending:
    """A decode the fake device ends ``after`` UNet calls later."""

    def __init__(self, engine: StepEngineFake, states: list[Trajectory], after: int) -> None:
        self.engine, self.states, self.ends_at = engine, states, engine.calls + after
        self.polled = 0

    def ready(self) -> bool:
        self.polled += 1
        return self.engine.calls >= self.ends_at

    def result(self) -> list[Any]:
        if self.engine.calls < self.ends_at:  # the device has not run it yet: the runner waits
            self.engine.waited.append(self.states[0].spec.samples[0].prompt)
        if self.engine.broken_decode:
            raise RuntimeError("the decode kernel failed")
        if self.engine.lost:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return [ValueError("the latents are not finite") if "NAN" in s.spec.samples[0].prompt
                else [f"image of {s.spec.samples[0].prompt}"] for s in self.states]


class StepEngineFake:
    def __init__(self, decode_after: int = 2) -> None:
        self.decode_after = decode_after
        self.calls = 0
        self.log: list[tuple[str, list[str]]] = []
        self.broken_start = self.broken_decode = self.lost = False
        self.pending: list[Pending] = []
        self.waited: list[str] = []  # decodes whose result was asked for before they ended
        self.oom_once_at: int | None = None  # the UNet call that runs out of memory (once)

    def begin(self, spec: BatchSpec) -> Trajectory:
        return Trajectory(spec)

    def step(self, states: list[Trajectory]) -> None:
        if self.oom_once_at == self.calls + 1:
            self.oom_once_at = None
            self.log.append(("out of memory", [s.spec.samples[0].prompt for s in states]))
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        self.calls += 1
        self.log.append(("step", [s.spec.samples[0].prompt for s in states]))
        for s in states:
            s.index += 1

    def start_decode(self, states: list[Trajectory]) -> Any:
        if "NOW" in states[0].spec.samples[0].prompt:  # e.g. another size: decoded at once
            self.log.append(("decode now", [s.spec.samples[0].prompt for s in states]))
            return DecodedNow(self.decode(states))
        if self.broken_start:
            raise RuntimeError("could not queue the decode")
        self.log.append(("decode", [s.spec.samples[0].prompt for s in states]))
        self.pending.append(Pending(self, list(states), self.decode_after))
        return self.pending[-1]

    def decode(self, states: list[Trajectory]) -> list[Any]:
        self.log.append(("decode alone", [s.spec.samples[0].prompt for s in states]))
        if "NAN" in states[0].spec.samples[0].prompt:
            raise ValueError("the latents are not finite")
        return [[f"image of {s.spec.samples[0].prompt}"] for s in states]

    def device_usable(self) -> bool:
        return not self.lost


class Executor(BatchExecutor):
    """The executor's statistics; deliveries reduced to a list of hand-overs."""

    def __init__(self) -> None:
        super().__init__(lambda: None)  # type: ignore[arg-type,return-value]
        self.outputs: list[StepOutput] = []

    def revoked(self, state: RequestState) -> bool:
        return False

    def finished_before(self, state: RequestState) -> bool:
        return False

    def accept(self, states: list[RequestState]) -> None:
        pass

    def progress(self, states: list[RequestState], now: float, engine: Any = None) -> None:
        pass

    def hand_over(self, output: StepOutput, t0: float, record: bool = True) -> None:
        self.outputs.append(output)

    def ended(self) -> dict[str, Any]:
        """Per request: its images, or its error's text."""
        return {e.id: (o.images if o.error is None else str(o.error))
                for out in self.outputs for e in out.requests for o in [out.outcomes[e.id]]}


class Pipeline:
    class upscaler:  # noqa: N801 - the attribute the runner reads
        runs_on_device = False

    def __init__(self, engine: StepEngineFake) -> None:
        self.engine = engine

    def release_memory(self) -> None:
        pass


def request(id: str, prompt: str, steps: int) -> RequestState:
    return RequestState(id, GenerateRequest(prompt=prompt, seed=1, width=64, height=64, steps=steps))


def run_until_drained(engine: StepEngineFake, *states: RequestState) -> tuple[StepRunner, Executor]:
    executor = Executor()
    pipeline = Pipeline(engine)
    runner = StepRunner(StepScheduler(16, 0.0), executor, lambda: pipeline)  # type: ignore[arg-type,return-value]
    for s in states:
        runner.add(s, "g")
    runner.start(timeout=5)
    deadline = time.monotonic() + 5
    while runner.snapshot()[0] and time.monotonic() < deadline:  # admitted at the first boundary
        time.sleep(0.001)
    assert runner.close() == []  # nothing left waiting
    runner.join(5)
    assert not runner.alive
    return runner, executor


def test_the_others_step_on_while_a_finished_request_decodes() -> None:
    engine = StepEngineFake(decode_after=2)
    runner, executor = run_until_drained(engine, request("a", "short", 2), request("b", "long", 6))
    assert engine.log == [
        ("step", ["short", "long"]), ("step", ["short", "long"]),
        ("decode", ["short"]),
        ("step", ["long"]), ("step", ["long"]),  # while "short" decodes on the device
        ("step", ["long"]), ("step", ["long"]),
        ("decode", ["long"]),
    ]
    assert engine.waited == ["long"]  # "short" was collected once ended; "long" had nothing to run beside it
    assert [[e.id for e in out.requests] for out in executor.outputs] == [["a"], ["b"]]
    assert executor.ended() == {"a": ["image of short"], "b": ["image of long"]}
    assert runner.scheduler.running == [] and runner.state is WorkerState.STOPPED
    assert executor.stats.unet_calls == 6


def test_a_decoding_request_counts_no_rows_and_leaves_when_collected() -> None:
    executor = Executor()
    engine = StepEngineFake(decode_after=5)
    pipeline = Pipeline(engine)
    runner = StepRunner(StepScheduler(16, 0.0), executor, lambda: pipeline)  # type: ignore[arg-type,return-value]
    a, b = request("a", "short", 1), request("b", "long", 4)
    for s in (a, b):
        runner.add(s, "g")
    runner._run(runner.scheduler.schedule(runner._clock()))
    assert a.decoding and runner.reserved_rows(a) == 0
    assert runner.scheduler.running_rows == runner.reserved_rows(b) == 2
    assert [e.id for e in runner.scheduler.running] == ["a", "b"] and executor.outputs == []
    for _ in range(3):
        runner._run(runner.scheduler.schedule(runner._clock()))
    assert engine.calls == 4 and executor.outputs == []  # b done, both decodes still on the device
    runner._run(runner.scheduler.schedule(runner._clock()))  # nothing left to step: wait for both decodes
    assert executor.ended() == {"a": ["image of short"], "b": ["image of long"]}
    assert runner.scheduler.running == [] and not a.decoding and a.denoising is None


def test_a_row_that_did_not_decode_fails_alone() -> None:
    engine = StepEngineFake()
    _, executor = run_until_drained(engine, request("a", "fine", 2), request("n", "NAN", 2),
                                    request("c", "also fine", 2))
    ended = executor.ended()
    assert ended["a"] == ["image of fine"] and ended["c"] == ["image of also fine"]
    assert "not finite" in ended["n"]
    assert [k for k, _ in engine.log].count("decode alone") == 0  # its error came with the decode


@pytest.mark.parametrize("broken", ["broken_start", "broken_decode"])
def test_a_decode_that_breaks_as_a_whole_is_retried_once_per_request(broken: str) -> None:
    engine = StepEngineFake()
    setattr(engine, broken, True)
    _, executor = run_until_drained(engine, request("a", "fine", 2), request("n", "NAN", 2))
    ended = executor.ended()
    assert ended["a"] == ["image of fine"] and "not finite" in ended["n"]
    assert engine.log.count(("decode alone", ["fine"])) == 1 and engine.log.count(("decode alone", ["NAN"])) == 1


def test_a_device_lost_in_a_decode_gives_its_requests_back() -> None:
    executor = Executor()
    engine = StepEngineFake(decode_after=1)
    pipeline = Pipeline(engine)
    runner = StepRunner(StepScheduler(16, 0.0), executor, lambda: pipeline)  # type: ignore[arg-type,return-value]
    faults: list[str] = []
    runner.on_fault = faults.append
    a, b = request("a", "short", 1), request("b", "long", 50)
    for s in (a, b):
        runner.add(s, "g")
    engine.lost = True  # the decode's error surfaces when its images are collected
    runner.start(timeout=5)
    runner.join(5)
    assert runner.state is WorkerState.FAULTED and faults and "illegal memory access" in faults[0]
    assert executor.outputs == []  # nobody failed
    held = runner.close()
    assert sorted(e.id for e in held) == ["a", "b"]
    assert all(e.denoising is None and not e.decoding for e in held)
    assert not runner._decodes


def test_engines_without_a_decode_stream_decode_at_once() -> None:
    class HostOnly:
        def decode(self, states: list[Any]) -> list[Any]:
            return [["img"] for _ in states]

    pending = start_decode(HostOnly(), [object(), object()])  # type: ignore[arg-type]
    assert isinstance(pending, DecodedNow) and pending.ready()
    assert pending.result() == [["img"], ["img"]]
    with pytest.raises(DeviceLost):
        class Lost:
            def decode(self, states: list[Any]) -> list[Any]:
                raise DeviceLost("gone")

        start_decode(Lost(), [object()])  # type: ignore[arg-type]


def test_out_of_memory_beside_a_decode_waits_for_it_and_keeps_the_row_limit() -> None:
    """The decode's memory is not counted in rows: the call runs again once the decodes
    have ended, and only a second failure would lower the limit."""
    engine = StepEngineFake(decode_after=3)
    engine.oom_once_at = 3  # the first call after "short"'s decode was queued
    runner, executor = run_until_drained(engine, request("a", "short", 2), request("b", "long", 4))
    assert engine.log[2:5] == [("decode", ["short"]), ("out of memory", ["long"]), ("step", ["long"])]
    assert engine.waited[0] == "short"  # collected before the retry
    assert runner.oom_row_limit is None and runner.scheduler.max_rows == 16
    assert executor.ended() == {"a": ["image of short"], "b": ["image of long"]}


def test_a_hand_over_that_breaks_fails_its_requests_and_the_loop_goes_on() -> None:
    engine = StepEngineFake()
    engine.start_decode = lambda states: DecodedNow([["only one"]])  # type: ignore[method-assign]
    runner, executor = run_until_drained(engine, request("a", "x", 2), request("b", "y", 2))
    ended = executor.ended()
    assert set(ended) == {"a", "b"} and all("could not be handed over" in str(v) for v in ended.values())
    assert runner.scheduler.running == [] and not runner._decodes


def test_a_decode_that_ended_first_is_handed_over_first() -> None:
    engine = StepEngineFake(decode_after=5)
    _, executor = run_until_drained(engine, request("a", "on the device", 1), request("b", "NOW", 2),
                                    request("c", "long", 8))
    assert ("decode now", ["NOW"]) in engine.log
    assert [[e.id for e in out.requests] for out in executor.outputs] == [["b"], ["a"], ["c"]]
