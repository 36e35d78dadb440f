"""The step loop's UNet-call statistics when the engine reports device time late
(CUDA: a step returns before the device has run it): each call gets its own
device time, in order, once it has ended; host-timed engines keep host seconds."""
from __future__ import annotations

from typing import Any

import pytest

from imagegenx.step_scheduler import StepScheduler
from workers.executor import BatchExecutor
from workers.step_runner import StepRunner


class LateEngine:
    """Reports a step's device time only once "the device" has run it."""

    times_steps_on_device = True

    def __init__(self) -> None:
        self.on_device: list[float] = []  # queued, not ended
        self.ended: list[float] = []

    def run(self, seconds: float) -> None:
        self.on_device.append(seconds)

    def device_runs_all_but_last(self) -> None:
        self.ended += self.on_device[:-1]
        self.on_device = self.on_device[-1:]

    def ended_step_seconds(self, wait: bool = False) -> list[float]:
        if wait:
            self.ended += self.on_device
            self.on_device = []
        out, self.ended = self.ended, []
        return out


class HostEngine:
    """Its step has ended when it returns (the synthetic engine, the CPU)."""


@pytest.fixture
def runner() -> StepRunner:
    def no_pipeline() -> Any:
        raise AssertionError("not used")

    return StepRunner(StepScheduler(16, 0.05), BatchExecutor(no_pipeline), no_pipeline)


def test_each_call_gets_its_own_device_time_once_it_has_ended(runner: StepRunner) -> None:
    engine, stats = LateEngine(), runner.executor.stats
    engine.run(0.010)
    runner._record_step(engine, 1, 0.001, 2)  # type: ignore[arg-type]
    assert stats.unet_calls == 0  # still on the device: nothing counted, not the host's 1 ms
    engine.run(0.020)
    engine.device_runs_all_but_last()  # the second call waited for the first
    runner._record_step(engine, 3, 0.001, 5)  # type: ignore[arg-type]
    assert (stats.unet_calls, stats.unet_rows, stats.model_rows) == (1, 1, 2)
    assert stats.unet_s == pytest.approx(0.010)
    runner._count_ended(engine, wait=True)  # e.g. revocation emptied the set: count the rest
    assert (stats.unet_calls, stats.unet_rows, stats.model_rows) == (2, 4, 7)
    assert stats.unet_s == pytest.approx(0.030)
    assert stats.rows_histogram == {1: 1, 3: 1}


def test_host_timed_engines_count_host_seconds_at_once(runner: StepRunner) -> None:
    runner._record_step(HostEngine(), 2, 0.004, 3)  # type: ignore[arg-type]
    stats = runner.executor.stats
    assert (stats.unet_calls, stats.unet_rows, stats.unet_s) == (1, 2, 0.004)


def test_a_device_error_while_reading_times_does_not_stop_the_loop(runner: StepRunner) -> None:
    class Broken(LateEngine):
        def ended_step_seconds(self, wait: bool = False) -> list[float]:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

    runner._record_step(Broken(), 1, 0.001, 2)  # type: ignore[arg-type]
    runner._count_ended(Broken(), wait=True)  # type: ignore[arg-type]
    assert runner.executor.stats.unet_calls == 0
