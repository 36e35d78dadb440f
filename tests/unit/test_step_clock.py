"""The step clock with fake timing events: one step ahead at most, device seconds
counted once a step's end has passed, none for a step that raised."""
from __future__ import annotations

import pytest

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

    def record(self) -> None:
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
