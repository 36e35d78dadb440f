"""A lost device (a sticky CUDA error) fails no request: the error is told apart
from a request's own failure and from out-of-memory, the synthetic engine stays
broken after it as a CUDA context does, and both model threads give every
request they hold back (running first) and end in FAULTED, asking the worker to
exit. The worker process's side is tests/integration/test_faults_device_lost.py."""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import torch

from imagegenx.batching import Batch, BatchPolicy
from imagegenx.engine.base import BatchSpec, Sample
from imagegenx.engine.synthetic import AcceleratorError, SyntheticEngine, parse_faults
from imagegenx.errors import DeviceLost, device_lost, is_device_lost
from imagegenx.pipeline import BatchPipeline
from imagegenx.request_state import RequestState
from imagegenx.schemas import GenerateRequest
from imagegenx.step_scheduler import StepScheduler
from imagegenx.storage import LocalStorage
from workers.executor import BatchExecutor
from workers.model_thread import WorkerState
from workers.runner import BatchRunner
from workers.step_runner import StepRunner


def test_device_errors_are_told_apart_from_a_requests_own_and_from_out_of_memory() -> None:
    class OutOfMemoryError(RuntimeError):  # the shape of torch.OutOfMemoryError
        pass

    assert is_device_lost(torch.AcceleratorError("CUDA error: an illegal memory access was encountered"))
    assert is_device_lost(AcceleratorError("CUDA error: invalid configuration argument"))
    assert is_device_lost(RuntimeError("CUDA error: device-side assert triggered"))
    assert is_device_lost(RuntimeError("CUBLAS_STATUS_EXECUTION_FAILED when calling `cublasGemmEx`"))
    assert is_device_lost(DeviceLost("gone"))
    assert not is_device_lost(OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert not is_device_lost(MemoryError())
    assert not is_device_lost(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not is_device_lost(ValueError("an illegal memory access"))  # not the runtime's error
    lost = device_lost(RuntimeError("CUDA error: unspecified launch failure"))
    assert isinstance(lost, DeviceLost) and str(lost) == "RuntimeError: CUDA error: unspecified launch failure"
    assert lost.__traceback__ is None


def spec(*prompts: str) -> BatchSpec:
    return BatchSpec(64, 64, 3, "euler", tuple(Sample(p, i) for i, p in enumerate(prompts)))


def test_the_synthetic_device_stays_lost_after_its_fault() -> None:
    assert parse_faults("device:GONE").device_markers == ("GONE",)
    engine = SyntheticEngine(faults="device:GONE")
    fine = engine.begin(spec("a calm lake"))
    engine.step([fine])
    with pytest.raises(AcceleratorError, match="illegal memory access"):
        engine.step([fine, engine.begin(spec("GONE"))])
    # Every later call fails, whatever it holds: the context is gone.
    for call in (lambda: engine.begin(spec("b")), lambda: engine.step([fine]),
                 lambda: engine.decode([fine]), lambda: engine.generate(spec("c"))):
        with pytest.raises(AcceleratorError):
            call()


def states(*prompts: str) -> list[RequestState]:
    return [RequestState(f"j{i}", GenerateRequest(prompt=p, seed=i, width=64, height=64, steps=3))
            for i, p in enumerate(prompts)]


def test_the_request_pipeline_raises_device_lost_without_failing_or_bisecting(tmp_path: Path) -> None:
    engine = SyntheticEngine(faults="device:GONE")
    pipe = BatchPipeline(engine, LocalStorage(tmp_path), "http://x", "m")
    with pytest.raises(DeviceLost, match="AcceleratorError: CUDA error"):
        pipe.draw(states("a", "b", "GONE c", "d"))
    assert pipe.image_limit is None


def test_the_batch_runner_gives_the_running_batch_back_first_and_faults() -> None:
    faults: list[str] = []
    started = threading.Event()

    def execute(batch: Batch[str]) -> None:
        started.set()
        raise DeviceLost("AcceleratorError: CUDA error: an illegal memory access was encountered")

    runner: BatchRunner[str] = BatchRunner(BatchPolicy(2, 0.0), execute)
    runner.on_fault = faults.append
    runner.start(timeout=5)
    runner.add("a", "k")
    runner.add("b", "k")
    assert started.wait(5)
    runner.join(5)
    assert not runner.alive and runner.state is WorkerState.FAULTED
    assert faults == ["AcceleratorError: CUDA error: an illegal memory access was encountered"]
    assert runner.fault == faults[0]
    runner.add("c", "k")  # received after the fault: buffered until the worker stops
    assert runner.close() == ["a", "b", "c"]
    assert runner.state is WorkerState.FAULTED  # closing does not hide the fault


def test_the_step_runner_gives_every_running_request_back_and_faults() -> None:
    def no_pipeline() -> Any:
        raise AssertionError("not used")

    runner = StepRunner(StepScheduler(16, 0.0), BatchExecutor(no_pipeline), no_pipeline)
    faults: list[str] = []
    runner.on_fault = faults.append
    ran: list[list[str]] = []

    def run(step: Any) -> None:  # the engine's call raised: see StepRunner._execute
        ran.append([e.id for e in step.running])
        for e in step.running:
            e.denoising = object()  # a trajectory on the lost device
        raise DeviceLost("AcceleratorError: CUDA error: unspecified launch failure")

    runner._run = run  # type: ignore[method-assign]
    a, b, c = states("a", "b", "c")
    runner.add(a, "g")
    runner.add(b, "g")
    runner.start(timeout=5)
    runner.join(5)
    assert not runner.alive and runner.state is WorkerState.FAULTED
    assert ran == [["j0", "j1"]] and faults == ["AcceleratorError: CUDA error: unspecified launch failure"]
    runner.add(c, "g")
    held = runner.close()
    assert [e.id for e in held] == ["j0", "j1", "j2"]  # oldest first, none left running
    assert all(e.denoising is None for e in held)
    assert runner.scheduler.running == []
