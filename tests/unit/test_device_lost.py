"""A lost device (a sticky CUDA error) fails no request: a device error is told
apart from a request's own failure and from out-of-memory, and the engine's probe
tells a lost device from one that still works (whose error is the request's own);
the synthetic engine stays broken after its fault as a CUDA context does; both
model threads give every request they hold back and end in FAULTED, asking the
worker to exit, and a fault while the worker drains is handed over too. The
worker process's side is tests/integration/test_faults_device_lost.py."""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import torch

from imagegenx.batching import Batch, BatchPolicy
from imagegenx.engine.base import BatchSpec, Sample
from imagegenx.engine.synthetic import AcceleratorError, SyntheticEngine, parse_faults
from imagegenx.errors import DeviceLost, device_lost, is_device_error, is_out_of_memory
from imagegenx.pipeline import BatchPipeline, lost_device
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

    assert is_device_error(torch.AcceleratorError("CUDA error: an illegal memory access was encountered"))
    assert is_device_error(AcceleratorError("CUDA error: invalid configuration argument"))
    assert is_device_error(RuntimeError("CUDA error: unknown error"))  # torch before 2.8: a plain RuntimeError
    assert is_device_error(RuntimeError("CUBLAS_STATUS_EXECUTION_FAILED when calling `cublasGemmEx`"))
    assert is_device_error(DeviceLost("gone"))
    assert not is_device_error(OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert not is_device_error(MemoryError())
    assert not is_device_error(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not is_device_error(ValueError("an illegal memory access"))  # not the runtime's error
    # An allocation inside cuBLAS or a CUDA graph: out of memory, not a lost device.
    workspace = torch.AcceleratorError("CUDA error: out of memory")
    assert is_out_of_memory(workspace) and not is_device_error(workspace)
    lost = device_lost(RuntimeError("CUDA error: unspecified launch failure"))
    assert isinstance(lost, DeviceLost) and str(lost) == "RuntimeError: CUDA error: unspecified launch failure"
    assert lost.__traceback__ is None


class Probed:
    def __init__(self, usable: bool | None) -> None:
        if usable is not None:
            self.device_usable = lambda: usable


def test_the_engines_probe_decides_whether_the_device_is_lost() -> None:
    sticky = AcceleratorError("CUDA error: an illegal memory access was encountered")
    assert isinstance(lost_device(Probed(False), sticky), DeviceLost)
    assert lost_device(Probed(True), sticky) is None  # the device works: the request's own failure
    assert isinstance(lost_device(Probed(None), sticky), DeviceLost)  # no probe: taken at its word
    broken = Probed(True)
    broken.device_usable = lambda: 1 / 0  # type: ignore[attr-defined]
    assert isinstance(lost_device(broken, sticky), DeviceLost)
    assert lost_device(Probed(False), RuntimeError("prompt too long")) is None  # not a device error


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


def test_a_device_error_that_leaves_the_device_usable_fails_its_request_alone(tmp_path: Path) -> None:
    class OneShapeFails(SyntheticEngine):
        """An invalid launch for one request: the device still works afterwards."""

        def generate(self, spec: BatchSpec, on_step: Any = None) -> Any:
            if any("WIDE" in s.prompt for s in spec.samples):
                raise AcceleratorError("CUDA error: invalid configuration argument")
            return super().generate(spec, on_step)

    pipe = BatchPipeline(OneShapeFails(), LocalStorage(tmp_path), "http://x", "m")
    out = pipe.run(states("a", "WIDE b", "c"))
    assert "invalid configuration argument" in str(out["j1"].error)
    assert out["j0"].result is not None and out["j2"].result is not None


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
    assert runner.snapshot() == (["a", "b", "c"], [])  # the lease keeper still refreshes them
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


def test_a_fault_while_the_worker_drains_is_handed_over_too() -> None:
    """SIGTERM first: the first ``close`` returns nothing, the running batch then
    loses the device; ``stop`` hands its requests to ``requeue`` as well."""
    from workers.runtime import WorkerRuntime

    started, release = threading.Event(), threading.Event()

    def execute(batch: Batch[str]) -> None:
        started.set()
        release.wait(5)
        raise DeviceLost("AcceleratorError: CUDA error: an illegal memory access was encountered")

    class Executor:
        def close(self, timeout: float | None = None) -> bool:
            return True

    runtime = WorkerRuntime.__new__(WorkerRuntime)  # the parts stop() uses, without a broker
    runtime.runner = BatchRunner(BatchPolicy(2, 0.0), execute)
    runtime.executor, runtime.leases, runtime._metrics_server = Executor(), None, None
    runtime.runner.start(timeout=5)
    runtime.runner.add("a", "k")
    assert started.wait(5)
    requeued: list[list[str]] = []

    def requeue(items: list[str]) -> None:
        requeued.append(items)
        release.set()  # the batch fails once the worker is draining

    assert runtime.stop(requeue=requeue) == ["a"]  # type: ignore[arg-type]
    assert requeued == [[], ["a"]]
    assert runtime.runner.state is WorkerState.FAULTED


def test_a_device_lost_in_upscaling_reaches_the_runner_without_failing_anyone(tmp_path: Path) -> None:
    """The request path draws, then enlarges on the device: a lost device there
    fails no request either, and is not probed twice."""
    engine = SyntheticEngine()
    pipe = BatchPipeline(engine, LocalStorage(tmp_path), "http://x", "m")

    class LostUpscaler:
        runs_on_device = True

        def upscale(self, images: Any, factors: Any) -> Any:
            engine.lost = "CUDA error: an illegal memory access was encountered"
            raise AcceleratorError(engine.lost)

    pipe.upscaler = LostUpscaler()  # type: ignore[assignment]
    wanted = [RequestState(f"u{i}", GenerateRequest(prompt="p", seed=i, width=64, height=64, steps=2,
                                                    postprocess={"upscale": 2}))
              for i in range(2)]
    with pytest.raises(DeviceLost, match="illegal memory access"):
        pipe.draw(wanted)
