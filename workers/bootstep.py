"""Worker bootsteps.

- ``BatchingWorkerStep``: loads the engine before the consumer takes work. On
  warm shutdown it gives the buffered messages back to the queue at once, then
  lets the running batch finish and waits until the finishing thread has
  stored every step output's results. It stops after the
  consumer bootstep (which only cancels consuming) and before the event loop
  (``Hub``, whose close runs the acks the finishing thread scheduled) and the
  broker connection (``Consumer.shutdown``, run by the worker's
  ``on_stopped``) are closed, so its rejects and acks still reach the broker.
- ``ConnectionLossStep``: when the consumer loses its broker connection, the
  buffered requests are dropped (their channel is gone, so their acks would be
  lost; the broker delivers their messages again), and after the reconnect
  their messages go back to the queue at once instead of after the visibility
  timeout.
"""
from __future__ import annotations

import logging
from typing import Any

from celery import bootsteps
from celery.worker import state as worker_state

log = logging.getLogger(__name__)


class BatchingWorkerStep(bootsteps.StartStopStep):
    """Owns the WorkerRuntime for the lifetime of the worker process."""

    requires = ("celery.worker.components:Pool",)
    label = "imagegenx batching"

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        super().__init__(worker, **kwargs)
        self.runtime: Any = None

    def create(self, worker: Any) -> "BatchingWorkerStep":
        return self

    def start(self, worker: Any) -> None:
        from workers.runtime import WorkerRuntime

        self.runtime = WorkerRuntime(worker.app.imagegenx_settings, hostname=worker.hostname)
        self.runtime.start()

    def info(self, worker: Any) -> dict[str, Any]:
        """Shown by ``celery inspect stats`` under "batching"."""
        return {"batching": self.runtime.describe() if self.runtime else None}

    def stop(self, worker: Any) -> None:
        self._shutdown()

    def terminate(self, worker: Any) -> None:
        self._shutdown()

    def _shutdown(self) -> None:
        if self.runtime is None:
            return
        runtime, self.runtime = self.runtime, None
        runtime.stop(requeue=_requeue)


def _requeue(states: list[Any]) -> None:
    """Give buffered messages back to the queue now.

    ``Request.reject`` only schedules the reject on the consumer's event loop,
    which no longer runs during shutdown: the scheduled calls run when the
    loop closes, after the running batch, so the buffer would wait for the
    batch. This runs in the thread that owns the loop (the stopping main
    thread), so it rejects on the channel directly.
    """
    for channel in {id(s.delivery.message.channel): s.delivery.message.channel for s in states}.values():
        _finish_pending_fetch(channel)
    requeued = 0
    for state in reversed(states):  # each goes in front of the last: the oldest ends up first
        req = state.delivery
        try:
            worker_state.task_ready(req)
            if not req.acknowledged:
                _give_back(req.message)
                req.acknowledged = True
                req.send_event("task-rejected", requeue=True)
                requeued += 1
        except Exception:  # noqa: BLE001 - broker gone: redelivered after visibility timeout
            log.exception("could not requeue %s", req.id)
    if states:
        log.info("requeued %d buffered requests", requeued)


def _give_back(message: Any) -> None:
    """Requeue at the head of the queue: these requests waited longest.

    A plain reject puts the message at the tail, behind everything queued
    meanwhile. On Redis the message goes back where kombu puts the messages of
    a lost worker (taken next); the ack then settles the channel's own record
    (the unacknowledged entry in Redis is already gone).
    """
    qos = message.channel.qos
    if not hasattr(qos, "restore_by_tag"):
        message.reject(requeue=True)
        return
    qos.restore_by_tag(message.delivery_tag)
    message.ack()


def _finish_pending_fetch(channel: Any) -> None:
    """Read the reply of a fetch (Redis BRPOP) still waiting on the server.

    Cancelling the consumer does not withdraw a BRPOP the server holds: it
    would take one of the messages requeued next, and that message would stay
    in this worker's socket until the connection closes, after the running
    batch. Reading the reply now (at most the BRPOP timeout, 1 s) hands a
    message it brought straight back to the queue (kombu requeues a message
    no consumer takes), as kombu does itself before closing a channel.
    """
    if getattr(channel, "_in_poll", None) and hasattr(channel, "_brpop_read"):
        try:
            channel._brpop_read()
        except Exception:  # noqa: BLE001 - nothing fetched (Empty) or broker gone
            pass


class ConnectionLossStep(bootsteps.StartStopStep):
    """Consumer bootstep: drops the batch buffer of a lost broker connection and
    puts its messages back in the queue once the connection is back.

    Celery restarts the consumer blueprint after a connection error: ``stop``
    runs with ``c.connection`` already cleared (on a warm shutdown it is still
    set, and ``BatchingWorkerStep`` requeues instead), then ``start`` once a
    new connection is up.
    """

    requires = ("celery.worker.consumer.tasks:Tasks",)
    label = "imagegenx connection loss"

    def __init__(self, c: Any, **kwargs: Any) -> None:
        super().__init__(c, **kwargs)
        # (delivery tag, latest delivery time this worker recorded) of dropped messages
        self.lost: list[tuple[str, float]] = []

    def create(self, c: Any) -> "ConnectionLossStep":
        return self

    def stop(self, c: Any) -> None:
        if c.connection is not None:
            return
        runtime = _runtime()
        if runtime is None:
            return
        dropped = runtime.drop_buffered()
        for state in dropped:
            tag = getattr(state.delivery.message, "delivery_tag", None)
            if tag is not None:
                self.lost.append((tag, max(state.received_at, state.leased_at)))
        if dropped:
            log.warning("broker connection lost: dropped %d buffered requests; their messages "
                        "go back to the queue once the broker answers", len(dropped))

    def start(self, c: Any) -> None:
        if not self.lost:
            return
        lost, self.lost = self.lost, []
        try:
            restored = _restore(c.task_consumer.channel, lost)
        except Exception as exc:  # noqa: BLE001 - they come back after the visibility timeout
            log.warning("could not requeue the messages of the lost connection (%r); the broker "
                        "delivers them again after the visibility timeout", exc)
            return
        log.info("requeued %d of %d messages buffered on the lost connection (the others "
                 "were requeued or delivered again already)", restored, len(lost))

    def shutdown(self, c: Any) -> None:
        pass


def _runtime() -> Any:
    from workers.runtime import current_runtime

    try:
        return current_runtime()
    except RuntimeError:
        return None


def _restore(channel: Any, lost: list[tuple[str, float]]) -> int:
    """Put unacknowledged messages of a dead channel back in their queue.

    Redis keeps every unacknowledged message in one hash with its delivery
    time in a sorted set, shared by all channels. A message is put back only
    if it is still recorded with this worker's delivery (a time no later than
    this worker received it or last refreshed it): one that kombu already
    requeued, or that was delivered again since, is left alone.
    """
    qos = channel.qos
    if not (hasattr(qos, "restore_by_tag") and hasattr(qos, "unacked_index_key")):
        return 0  # not the Redis transport: nothing to do before the visibility timeout
    restored = 0
    for tag, recorded_at in reversed(lost):  # each goes in front of the last: oldest first
        score = channel.client.zscore(qos.unacked_index_key, tag)
        if score is None or score > recorded_at:
            continue
        qos.restore_by_tag(tag)
        restored += 1
    return restored
