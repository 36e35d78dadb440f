"""Errors that travel in task results. Kept free of heavy imports so that a
Celery client can rebuild them when it reads a FAILURE result."""
from __future__ import annotations


class GenerationError(Exception):
    """A request could not be turned into images; the message says why."""
