"""Remote-control and inspect commands of the batching worker.

``celery -A tasks inspect batching`` shows buffered/running requests and the
batch statistics; ``celery -A tasks control set_batching MAX_BATCH MAX_WAIT_MS``
changes the batching limits of live workers (the prefetch window follows).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import click
from celery.worker.control import control_command, inspect_command

from workers.runtime import current_runtime


@dataclass(frozen=True)
class Arg:
    """Converts a `celery control` argument on the client side; text that is not a
    number is a one-line usage error naming the argument (a bare int() would print a
    ValueError traceback)."""

    name: str
    kind: click.ParamType

    def __call__(self, text: str) -> Any:
        try:
            return self.kind.convert(text, None, None)
        except click.BadParameter as exc:
            raise click.BadParameter(exc.message, param_hint=f"'{self.name}'") from None


@inspect_command()
def batching(state: Any, **_: Any) -> dict[str, Any]:
    """Batching state and statistics of this worker, and the queues it consumes now
    (fewer after ``celery control cancel_consumer``)."""
    consumer = getattr(state, "consumer", None)
    task_consumer = getattr(consumer, "task_consumer", None)
    queues = [q.name for q in getattr(task_consumer, "queues", None) or []]
    return {**current_runtime().describe(), "consuming": queues}


@control_command(
    args=[("max_batch", Arg("max_batch", click.INT)), ("max_wait_ms", Arg("max_wait_ms", click.FLOAT))],
    signature="<max_batch> [max_wait_ms]",
)
def set_batching(state: Any, max_batch: int | None = None, max_wait_ms: float | None = None,
                 **_: Any) -> dict[str, Any]:
    """Change max_batch (images per batch) and max_wait_ms on a live worker."""
    # A broadcast sent from Python skips the CLI's conversion.
    for name, value, kind in (("max_batch", max_batch, int), ("max_wait_ms", max_wait_ms, (int, float))):
        if value is not None and (isinstance(value, bool) or not isinstance(value, kind)):
            return {"error": f"{name} must be a number, got {value!r}"}
    runtime = current_runtime()
    settings = runtime.settings
    if max_batch is not None and not settings.max_num_images <= max_batch <= 256:
        return {"error": f"max_batch must be between max_num_images "
                         f"({settings.max_num_images}) and 256, got {max_batch}"}
    if max_wait_ms is not None and not 0 <= max_wait_ms <= 60_000:
        return {"error": f"max_wait_ms must be between 0 and 60000, got {max_wait_ms}"}
    runtime.runner.set_limits(
        max_batch=max_batch, max_wait=None if max_wait_ms is None else max_wait_ms / 1000.0
    )
    if max_batch is not None:
        qos = state.consumer.qos
        qos.value = settings.model_copy(update={"max_batch": max_batch}).prefetch  # the same rule as at start
        qos.update()
    max_batch, max_wait = runtime.runner.limits()
    return {"ok": f"max_batch={max_batch} max_wait_ms={max_wait * 1000:g}"}
