"""The model-owning thread's lifecycle, shared by both schedulers.

One state enum instead of several flags: the consumer thread reads it to know
whether the worker may take work, the model thread to know whether to admit
more, and ``celery inspect batching`` shows it.
"""
from __future__ import annotations

import enum
import logging
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)


class WorkerState(enum.Enum):
    """Where a worker's model thread is in its life."""

    NEW = "new"            # created, thread not started
    STARTING = "starting"  # loading and warming up the engine
    READY = "ready"        # taking work
    DRAINING = "draining"  # warm shutdown: nothing new starts, what runs finishes
    STOPPED = "stopped"    # the thread has returned
    DEFUNCT = "defunct"    # the engine could not be set up
    FAULTED = "faulted"    # the device was lost mid-run: requests back to waiting, the worker exits


class ModelThread:
    """A thread that runs ``setup()`` once, then ``serve()`` until it returns.

    Subclasses implement ``serve``, waiting on ``self._cond`` and leaving when
    the state is ``DRAINING`` and their work is done. ``self._cond`` also
    guards the subclass's shared structures (buffer, scheduler).
    """

    def __init__(self, setup: Callable[[], None], name: str) -> None:
        self._setup = setup
        self._cond = threading.Condition()
        self._state = WorkerState.NEW
        self._setup_error: BaseException | None = None
        # Why the device was lost (FAULTED), and who is told: the runtime stops the worker.
        self.fault: str | None = None
        self.on_fault: Callable[[str], None] = lambda reason: None
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)

    @property
    def state(self) -> WorkerState:
        return self._state

    def _set_state(self, state: WorkerState) -> None:
        with self._cond:
            self._state = state
            self._cond.notify_all()

    def start(self, timeout: float | None = None) -> None:
        """Start the thread and wait until ``setup`` finished (re-raising its error)."""
        self._set_state(WorkerState.STARTING)
        self._thread.start()
        with self._cond:
            if not self._cond.wait_for(lambda: self._state is not WorkerState.STARTING, timeout):
                raise TimeoutError("engine setup did not finish in time")
        if self._setup_error is not None:
            raise RuntimeError("engine setup failed") from self._setup_error

    def _fault(self, reason: str) -> None:
        """Called with ``self._cond`` held, once the requests held are back in
        waiting: nothing more runs in this process (``close`` hands the waiting
        requests back to the queue), and ``on_fault`` asks the worker to exit."""
        log.critical("the device failed (%s): this worker stops and gives its requests back; "
                     "a fresh process can use the device again", reason)
        self.fault = reason
        self._state = WorkerState.FAULTED
        self._cond.notify_all()
        try:
            self.on_fault(reason)
        except Exception:  # noqa: BLE001 - the state says it anyway
            log.exception("could not ask the worker to stop")

    def _begin_draining(self) -> None:
        """Called with ``self._cond`` held: nothing new starts from now on."""
        if self._state in (WorkerState.READY, WorkerState.STARTING, WorkerState.NEW):
            self._state = WorkerState.DRAINING
        self._cond.notify_all()

    def join(self, timeout: float | None = None) -> None:
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def draining(self) -> bool:
        return self._state is WorkerState.DRAINING

    def serve(self) -> None:
        raise NotImplementedError

    def _main(self) -> None:
        try:
            self._setup()
        except BaseException as exc:  # noqa: BLE001 - reported to start()
            log.exception("engine setup failed")
            self._setup_error = exc
            self._set_state(WorkerState.DEFUNCT)
            return
        with self._cond:
            if self._state is WorkerState.STARTING:
                self._state = WorkerState.READY
            self._cond.notify_all()
        try:
            self.serve()
        finally:
            with self._cond:
                if self._state is not WorkerState.FAULTED:  # the fault stays visible
                    self._state = WorkerState.STOPPED
                self._cond.notify_all()
