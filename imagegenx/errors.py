"""Errors that travel in task results, and how errors are told apart. Kept free
of heavy imports so that a Celery client can rebuild them when it reads a
FAILURE result."""
from __future__ import annotations


class GenerationError(Exception):
    """A request could not be turned into images; the message says why."""


class BatchSetupError(GenerationError):
    """What every request of a batch shares could not be set up (e.g. its LoRA set).

    The whole batch fails at once: running smaller parts of it cannot help, and
    an out-of-memory error here says nothing about how many images fit.
    """


def is_out_of_memory(exc: BaseException) -> bool:
    """An out-of-memory error: MemoryError, or torch's ``OutOfMemoryError`` (matched by
    name, so this module needs no torch)."""
    return isinstance(exc, MemoryError) or any(
        cls.__name__ == "OutOfMemoryError" for cls in type(exc).__mro__
    )
