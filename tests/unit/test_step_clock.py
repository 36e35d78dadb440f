"""The step clock with fake timing events: one step ahead at most, device seconds
counted once a step's end has passed, none for a step that raised."""
from __future__ import annotations

from pathlib import Path

import pytest

from imagegenx.engine import row_samplers
from imagegenx.engine.base import BatchSpec, Sample
from imagegenx.engine.diffusion import DiffusionEngine
from imagegenx.engine.step_clock import CallLedger, DeviceStepClock


class FakeDevice:
    """A device that runs recorded events in order when told to."""

    def __init__(self) -> None:
        self.now_ms = 0.0
        self.queue: list[FakeEvent] = []

    def run_until(self, event: FakeEvent, ms_per_event: float = 5.0) -> None:
        while not event.done:
            nxt = self.queue.pop(0)
            self.now_ms += ms_per_event
            nxt.done, nxt.at_ms = True, self.now_ms


class FakeEvent:
    def __init__(self, device: FakeDevice) -> None:
        self.device = device
        self.done = False
        self.at_ms = 0.0
        self.waited = 0
        self.stream: object = None

    def record(self, stream: object = None) -> None:
        self.stream = stream
        self.device.queue.append(self)

    def query(self) -> bool:
        return self.done

    def synchronize(self) -> None:
        self.waited += 1
        self.device.run_until(self)

    def elapsed_time(self, end: FakeEvent) -> float:
        assert self.done and end.done
        return end.at_ms - self.at_ms


@pytest.fixture
def device() -> FakeDevice:
    return FakeDevice()


def step(clock: DeviceStepClock) -> None:
    clock.begin()
    clock.wait_for_previous()
    clock.end()


def test_a_step_waits_for_the_one_before_and_no_further(device: FakeDevice) -> None:
    clock = DeviceStepClock(lambda: FakeEvent(device))
    step(clock)
    assert device.queue and not any(e.done for e in device.queue)  # nothing waited for
    first_end = device.queue[-1]
    step(clock)
    assert first_end.done and first_end.waited == 1  # the first step has ended
    assert len(device.queue) == 2 and not any(e.done for e in device.queue)  # the second is queued


def test_ended_steps_are_counted_once_in_device_seconds(device: FakeDevice) -> None:
    clock = DeviceStepClock(lambda: FakeEvent(device))
    step(clock)
    assert clock.take_ended() == []  # queued, not ended
    step(clock)
    assert clock.take_ended() == [0.005]  # the first: start and end events 5 ms apart
    assert clock.take_ended() == []
    device.run_until(device.queue[-1])  # a decode waits for everything
    assert clock.take_ended() == [0.005]


def test_a_step_that_raised_counts_nothing(device: FakeDevice) -> None:
    clock = DeviceStepClock(lambda: FakeEvent(device))
    clock.begin()
    clock.abandon()
    with pytest.raises(RuntimeError):
        clock.end()
    step(clock)
    device.run_until(device.queue[-1])
    assert clock.take_ended() == [0.005]


def test_the_ledger_gives_each_call_its_own_device_time_in_order() -> None:
    recorded: list[tuple[int, float, int]] = []
    ledger = CallLedger(lambda rows, seconds, unet_rows: recorded.append((rows, seconds, unet_rows)))
    ledger.queued(3, 5)
    ledger.ended([])  # still on the device
    ledger.queued(4, 8)
    ledger.ended([0.010])  # the first call ended
    assert recorded == [(3, 0.010, 5)] and len(ledger) == 1
    ledger.ended([0.020, 0.030])  # more ended than queued: the extra is nobody's
    assert recorded == [(3, 0.010, 5), (4, 0.020, 8)] and len(ledger) == 0


def test_events_are_recorded_on_the_engines_stream(device: FakeDevice) -> None:
    stream = object()
    clock = DeviceStepClock(lambda: FakeEvent(device), stream=lambda: stream)
    step(clock)
    assert [e.stream for e in device.queue] == [stream, stream]


def test_take_ended_with_wait_counts_the_last_step_too(device: FakeDevice) -> None:
    clock = DeviceStepClock(lambda: FakeEvent(device))
    step(clock)
    step(clock)
    assert clock.take_ended(wait=True) == [0.005, 0.005]
    assert clock.take_ended(wait=True) == []


def test_the_engine_marks_each_step_and_abandons_one_that_raised(
        tiny_model: Path, device: FakeDevice, monkeypatch: pytest.MonkeyPatch) -> None:
    """The diffusion engine's step with a clock (on CUDA it has one; here a fake):
    one start and one end per step, and a step that raised leaves its rows unmoved
    and counts nothing."""
    engine = DiffusionEngine.load(tiny_model)
    assert not engine.times_steps_on_device and engine.ended_step_seconds() is None  # CPU
    engine._step_clock = DeviceStepClock(lambda: FakeEvent(device))
    w, h = engine.native_size
    state = engine.begin(BatchSpec(width=w, height=h, steps=4, sampler="euler",
                                   samples=(Sample("a red circle", seed=1),)))
    engine.step([state])
    engine.step([state])
    assert engine.times_steps_on_device
    assert engine.ended_step_seconds() == [0.005]  # the second step waited for the first

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("the sampler step failed")

    monkeypatch.setattr(row_samplers, "advance", broken)
    before = [row.index for row in state.rows_state]
    with pytest.raises(RuntimeError):
        engine.step([state])
    assert [row.index for row in state.rows_state] == before
    monkeypatch.undo()
    engine.step([state])
    engine.step([state])
    assert state.done
    assert len(engine.ended_step_seconds(wait=True)) == 3  # the 2nd, 3rd and 4th steps; not the failed one
