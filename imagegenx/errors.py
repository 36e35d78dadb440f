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


class DeviceLost(Exception):
    """The accelerator failed in a way no request caused alone and no retry in this
    process can mend (a sticky CUDA error): the worker gives its requests back to
    the queue and exits, so that its supervisor starts a fresh process."""


# Phrases of the CUDA runtime's errors that leave the context unusable; torch
# raises them as ``torch.AcceleratorError`` (a RuntimeError) since 2.8, and as a
# plain RuntimeError from some libraries (cuBLAS, cuDNN, NCCL).
_STICKY_DEVICE_ERRORS = (
    "illegal memory access",
    "illegal instruction",
    "misaligned address",
    "unspecified launch failure",
    "device-side assert",
    "uncorrectable ecc",
    "fallen off the bus",
    "cuda-capable device(s) is/are busy or unavailable",
    "cublas_status_execution_failed",
    "cudnn_status_execution_failed",
    "cudnn_status_internal_error",
)


def is_device_lost(exc: BaseException) -> bool:
    """An accelerator error that is not out-of-memory: CUDA reports a failed kernel at
    a later call, so the call that raises it is not known to be the culprit, and the
    context is often unusable. Matched by class name and message, without torch.

    ``torch.AcceleratorError`` counts whatever its message: telling its sticky
    errors from the rest by message would be a guess, and the worst a wrong guess
    costs here is one restart (a request that causes it every time ends FAILURE
    after ``max_deliveries`` runs).
    """
    if isinstance(exc, DeviceLost):
        return True
    if is_out_of_memory(exc):
        return False
    if any(cls.__name__ == "AcceleratorError" for cls in type(exc).__mro__):
        return True
    if not isinstance(exc, RuntimeError):
        return False
    message = str(exc).lower()
    return any(phrase in message for phrase in _STICKY_DEVICE_ERRORS)


def device_lost(exc: BaseException) -> DeviceLost:
    """``exc`` as a :class:`DeviceLost` that holds no traceback (its frames hold tensors)."""
    if isinstance(exc, DeviceLost):
        return exc
    return DeviceLost(f"{type(exc).__name__}: {exc}")
