"""Device time of the step loop's UNet calls, without waiting for the device.

``DiffusionEngine.step`` queues its work and returns while the GPU still runs
it (one step ahead, no further), so the host's clock around a step measures
launches, not the call. This clock marks each step with a pair of CUDA timing
events and sums a step's device time once its end event has passed; the step
runner pairs each ended step's seconds with that call's rows (``take_ended``),
so ``unet_seconds`` and the step histogram stay device time. It also holds the loop to one step ahead:
``wait_for_previous`` returns once the step before has ended on the device.
"""
from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

log = logging.getLogger(__name__)

# Steps whose device time nobody has taken yet are kept up to this many (a
# benchmark or a test may step without taking them; the worker takes them each step).
MAX_UNTAKEN_STEPS = 1024


class TimingEvent(Protocol):
    """What the clock needs of ``torch.cuda.Event(enable_timing=True)``."""

    def record(self, stream: Any = None) -> None: ...

    def query(self) -> bool: ...

    def synchronize(self) -> None: ...

    def elapsed_time(self, end: TimingEvent) -> float: ...  # milliseconds


class DeviceStepClock:
    """Start and end events of every step; see the module docstring."""

    def __init__(self, new_event: Callable[[], TimingEvent],
                 stream: Callable[[], Any] = lambda: None) -> None:
        """``stream()``: where the engine's work runs (events are recorded there)."""
        self._new_event = new_event
        self._stream = stream
        self._start: TimingEvent | None = None
        # Steps ended on the host, maybe not yet on the device.
        self._steps: deque[tuple[TimingEvent, TimingEvent]] = deque(maxlen=MAX_UNTAKEN_STEPS)

    def begin(self) -> None:
        """Before a step's first queued work."""
        self._start = self._new_event()
        self._start.record(self._stream())

    def wait_for_previous(self) -> None:
        """Once this step's main work is queued: wait until the step before it has
        ended on the device, so at most this step is still queued."""
        if self._steps:
            self._steps[-1][1].synchronize()

    def end(self) -> None:
        """After a step's last queued work."""
        if self._start is None:
            raise RuntimeError("end() without begin()")
        end = self._new_event()
        end.record(self._stream())
        self._steps.append((self._start, end))
        self._start = None

    def abandon(self) -> None:
        """A step that raised before ``end``: nothing of it is counted."""
        self._start = None

    def take_ended(self, wait: bool = False) -> list[float]:
        """Device seconds of each step that has ended since the last call, oldest
        first; with ``wait``, of every step (waiting for the last one to end)."""
        if wait:
            self.wait_for_previous()  # the last step that ended on the host
        ended = []
        while self._steps and self._steps[0][1].query():
            start, end = self._steps.popleft()
            ended.append(start.elapsed_time(end) / 1000.0)
        return ended


class CallLedger:
    """UNet calls queued on the device whose device time is not known yet: each
    ended step's seconds go to the oldest such call, in order (the device runs
    them in order), through ``record(image_rows, seconds, unet_rows)``."""

    def __init__(self, record: Callable[[int, float, int], None]) -> None:
        self._record = record
        self._calls: deque[tuple[int, int]] = deque()

    def queued(self, image_rows: int, unet_rows: int) -> None:
        self._calls.append((image_rows, unet_rows))

    def ended(self, seconds: list[float]) -> None:
        for k, device_s in enumerate(seconds):
            if not self._calls:
                log.debug("%d ended steps of no queued call (stepped outside the loop)", len(seconds) - k)
                return
            image_rows, unet_rows = self._calls.popleft()
            self._record(image_rows, device_s, unet_rows)

    def __len__(self) -> int:
        return len(self._calls)
