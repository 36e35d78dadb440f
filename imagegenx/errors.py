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
    """An out-of-memory error: MemoryError, torch's ``OutOfMemoryError`` (matched by
    name, so this module needs no torch), or a CUDA error that says so (an
    allocation inside cuBLAS, cuDNN or a CUDA graph raises ``CUDA error: out of
    memory`` as a plain device error)."""
    if isinstance(exc, MemoryError) or any(cls.__name__ == "OutOfMemoryError" for cls in type(exc).__mro__):
        return True
    return isinstance(exc, RuntimeError) and "cuda error: out of memory" in str(exc).lower()


class DeviceLost(Exception):
    """The accelerator failed in a way no request caused alone and no retry in this
    process can mend (a sticky CUDA error): the worker gives its requests back to
    the queue and exits, so that its supervisor starts a fresh process."""


# How a device error reads when it comes as a plain RuntimeError: torch raises
# CUDA errors as ``torch.AcceleratorError`` (a RuntimeError) since 2.8, and as a
# plain RuntimeError before, and from some libraries (cuBLAS, cuDNN).
_DEVICE_ERROR_MARKS = (
    "cuda error",
    "cublas_status_",
    "cudnn_status_",
    "device-side assert",
    "illegal memory access",
    "unspecified launch failure",
)


def is_device_error(exc: BaseException) -> bool:
    """An error the accelerator reported, other than out-of-memory. Matched by
    class name and message, without torch.

    Whether it lost the device is for a probe to tell (the engine's
    ``device_usable``): CUDA reports a failed kernel at a later call, so the call
    that raises is not known to be the culprit, and a sticky error (an illegal
    memory access, a device-side assert, a GPU off the bus) makes every later call
    fail, the probe included; a non-sticky one (an invalid launch argument for one
    request's shape) leaves the device usable and fails that request alone.
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
    return any(mark in message for mark in _DEVICE_ERROR_MARKS)


def device_lost(exc: BaseException) -> DeviceLost:
    """``exc`` as a :class:`DeviceLost` that holds no traceback (its frames hold tensors)."""
    if isinstance(exc, DeviceLost):
        return exc
    return DeviceLost(f"{type(exc).__name__}: {exc}")


def first_line(exc: BaseException) -> str:
    """``exc`` for a one-line log or refusal: its type and the first line of its message
    (library errors often run to pages; the first line names what went wrong)."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__
