"""Errors that travel in task results. Kept free of heavy imports so that a
Celery client can rebuild them when it reads a FAILURE result."""
from __future__ import annotations


class GenerationError(Exception):
    """A request could not be turned into images; the message says why."""


class BatchSetupError(GenerationError):
    """What every request of a batch shares could not be set up (e.g. its LoRA set).

    The whole batch fails at once: running smaller parts of it cannot help, and
    an out-of-memory error here says nothing about how many images fit.
    """
