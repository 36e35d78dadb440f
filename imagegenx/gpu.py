"""GPU name, utilisation and memory through NVML (nvidia-ml-py), when present.

NVML numbers the physical GPUs and ignores CUDA_VISIBLE_DEVICES, so the GPUs
a worker reports are the ones its CUDA_VISIBLE_DEVICES names (indices or
GPU-/MIG- UUIDs), or all of them when it is unset. Without the library, the
driver or a GPU, ``visible_gpus()`` returns an empty list: nothing is
reported, nothing fails.
"""
from __future__ import annotations

import logging
import os
import threading
from dataclasses import asdict, dataclass
from typing import Any

log = logging.getLogger(__name__)

_lock = threading.Lock()
_state: dict[str, Any] = {"init": None}  # None: not tried; False: unavailable; True: ready


@dataclass(frozen=True)
class GpuStat:
    index: int  # NVML (physical) index, as nvidia-smi lists it
    uuid: str
    name: str
    utilization: float | None  # share of the last sample period the GPU was busy, 0..1
    memory_used_bytes: int
    memory_total_bytes: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _nvml() -> Any | None:
    """The initialised pynvml module, or None when NVML cannot be used here."""
    with _lock:
        if _state["init"] is False:
            return None
        try:
            import pynvml
        except ImportError:
            _state["init"] = False
            return None
        if _state["init"] is None:
            try:
                pynvml.nvmlInit()
            except Exception as exc:  # noqa: BLE001 - NVMLError_LibraryNotFound, DriverNotLoaded...
                log.debug("NVML unavailable: %s", exc)
                _state["init"] = False
                return None
            _state["init"] = True
        return pynvml


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _visible_handles(nvml: Any) -> list[tuple[int, Any]]:
    count = nvml.nvmlDeviceGetCount()
    spec = os.environ.get("CUDA_VISIBLE_DEVICES")
    if spec is None:
        return [(i, nvml.nvmlDeviceGetHandleByIndex(i)) for i in range(count)]
    handles = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        if part.isdigit():
            index = int(part)
            if index >= count:
                break  # CUDA stops at the first invalid entry too
            handles.append((index, nvml.nvmlDeviceGetHandleByIndex(index)))
            continue
        try:  # GPU-... or MIG-... UUID
            handle = nvml.nvmlDeviceGetHandleByUUID(part)
        except Exception:  # noqa: BLE001 - unknown UUID: CUDA stops there as well
            break
        try:
            index = nvml.nvmlDeviceGetIndex(handle)
        except Exception:  # noqa: BLE001 - MIG devices have no physical index
            index = -1
        handles.append((index, handle))
    return handles


def visible_gpus() -> list[GpuStat]:
    """A fresh reading of the GPUs this process may use; [] without NVML."""
    nvml = _nvml()
    if nvml is None:
        return []
    out = []
    try:
        for index, handle in _visible_handles(nvml):
            memory = nvml.nvmlDeviceGetMemoryInfo(handle)
            try:
                busy: float | None = nvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100.0
            except Exception:  # noqa: BLE001 - not supported on MIG instances
                busy = None
            out.append(GpuStat(index=index, uuid=_text(nvml.nvmlDeviceGetUUID(handle)),
                               name=_text(nvml.nvmlDeviceGetName(handle)), utilization=busy,
                               memory_used_bytes=int(memory.used),
                               memory_total_bytes=int(memory.total)))
    except Exception as exc:  # noqa: BLE001 - a GPU that fell off the bus must not break callers
        log.warning("NVML query failed: %s", exc)
        return []
    return out
