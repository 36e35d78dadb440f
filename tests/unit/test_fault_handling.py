"""Fault handling without a broker: the synthetic engine's injected faults, the
pipeline's isolation of a failing request and its out-of-memory limit, and the
runner handing back its buffer while a batch still runs."""
from __future__ import annotations

import threading
from pathlib import Path

import pytest

from imagegenx.batching import Batch, BatchPolicy
from imagegenx.engine.base import BatchSpec, Sample
from imagegenx.engine.synthetic import (
    InjectedFault,
    OutOfMemoryError,
    SyntheticEngine,
    parse_faults,
)
from imagegenx.errors import is_out_of_memory
from imagegenx.pipeline import BatchPipeline
from imagegenx.request_state import RequestState
from imagegenx.schemas import GenerateRequest
from imagegenx.settings import Settings
from imagegenx.storage import LocalStorage
from workers.runner import BatchRunner


def spec(*prompts: str) -> BatchSpec:
    return BatchSpec(64, 64, 2, "euler", tuple(Sample(p, i) for i, p in enumerate(prompts)))


def test_fault_spec_is_parsed_and_checked() -> None:
    f = parse_faults("raise:POISON, oom:4,exit:KILL")
    assert (f.raise_markers, f.oom_above, f.exit_markers) == (("POISON",), 4, ("KILL",))
    assert not parse_faults("")
    for bad in ("boom:1", "oom:zero", "raise", "oom:0"):
        with pytest.raises(ValueError):
            parse_faults(bad)
    with pytest.raises(ValueError, match="synthetic fault"):
        Settings(synthetic_faults="explode:now")


def test_synthetic_engine_injects_its_faults() -> None:
    engine = SyntheticEngine(faults="raise:POISON,oom:2")
    assert len(engine.generate(spec("a", "b"))) == 2
    with pytest.raises(InjectedFault, match="'POISON'"):
        engine.generate(spec("a", "POISON b"))
    with pytest.raises(OutOfMemoryError) as info:
        engine.generate(spec("a", "b", "c"))
    assert isinstance(info.value, MemoryError) and is_out_of_memory(info.value)


def test_out_of_memory_is_recognised_by_name() -> None:
    class OutOfMemoryError(RuntimeError):  # the shape of torch.cuda.OutOfMemoryError
        pass

    assert is_out_of_memory(OutOfMemoryError("CUDA out of memory"))
    assert not is_out_of_memory(RuntimeError("something else"))


def states(*prompts: str, images: int = 1) -> list[RequestState]:
    return [RequestState(f"j{i}", GenerateRequest(prompt=p, seed=i, width=64, height=64,
                                                  steps=2, num_images=images))
            for i, p in enumerate(prompts)]


def pipeline(tmp_path: Path, faults: str) -> BatchPipeline:
    return BatchPipeline(SyntheticEngine(faults=faults), LocalStorage(tmp_path), "http://x", "m")


def test_the_request_that_breaks_its_batch_fails_alone(tmp_path: Path) -> None:
    out = pipeline(tmp_path, "raise:POISON").run(states("a", "b", "POISON c", "d", "e"))
    assert "injected fault" in str(out["j2"].error)
    assert all(out[f"j{i}"].result is not None for i in (0, 1, 3, 4))


def test_out_of_memory_halves_and_remembers_the_limit(tmp_path: Path) -> None:
    p = pipeline(tmp_path, "oom:3")
    out = p.run(states(*"abcdefgh"))
    assert all(o.result is not None for o in out.values())
    assert {o.result.batch.size for o in out.values() if o.result} == {2}
    assert p.image_limit == 2  # 8 failed -> 4, 4 failed -> 2
    out = p.run(states(*"abcde"))  # cut to fit before running: no new failure
    assert [o.result.batch.size for o in out.values() if o.result] == [2, 2, 2, 2, 1]
    out = p.run(states("big", images=4))  # alone and too large: fails, limit kept
    assert "out of memory with 4 images in one batch" in str(out["j0"].error)
    assert p.image_limit == 2


def test_runner_hands_back_its_buffer_while_the_batch_runs() -> None:
    running = threading.Event()
    release = threading.Event()
    ran: list[list[str]] = []

    def execute(batch: Batch[str]) -> None:
        ran.append(batch.items)
        running.set()
        release.wait(5)

    runner: BatchRunner[str] = BatchRunner(BatchPolicy(2, 0.0), execute)
    runner.start(timeout=5)
    runner.add("a", "k")
    assert running.wait(5)
    runner.add("b", "k")
    runner.add("c", "k")
    assert runner.close() == ["b", "c"]  # at once, while "a" still runs
    assert runner.alive
    release.set()
    runner.join(5)
    assert not runner.alive
    assert ran == [["a"]]


def test_batch_setup_error_fails_the_batch_at_once_without_bisection(tmp_path: Path) -> None:
    """A failure of what the whole batch shares (its LoRA set) is not the fault of
    one request and not a matter of size: one engine call, every request fails,
    and no image limit is learnt, even when it was out of memory."""
    from imagegenx.errors import BatchSetupError
    from imagegenx.pipeline import BatchPipeline
    from imagegenx.request_state import RequestState
    from imagegenx.schemas import GenerateRequest
    from imagegenx.storage import LocalStorage

    class SetupFails:
        name, native_size, samplers = "setup", (64, 64), ("euler",)
        calls = 0

        def generate(self, spec, on_step=None):  # type: ignore[no-untyped-def]
            SetupFails.calls += 1
            raise BatchSetupError("out of memory merging LoRAs ['style']")

    pipe = BatchPipeline(SetupFails(), LocalStorage(tmp_path), "http://x", "m")  # type: ignore[arg-type]
    out = pipe.run([RequestState(f"j{i}", GenerateRequest(prompt="p", seed=i, width=64, height=64))
                    for i in range(4)])
    assert SetupFails.calls == 1
    assert all("merging LoRAs" in str(o.error) for o in out.values())
    assert pipe.image_limit is None
