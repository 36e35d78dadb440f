"""postprocess.upscale through the pipeline: Lanczos with the rendering, a device
upscaler once per batch right after the engine, and failures that stay with the
requests that asked for upscaling."""
from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import pytest
from PIL import Image

from imagegenx.engine.synthetic import SyntheticEngine
from imagegenx.pipeline import BatchPipeline
from imagegenx.request_state import RequestState
from imagegenx.schemas import GenerateRequest
from imagegenx.storage import LocalStorage
from imagegenx.upscale import LanczosUpscaler


def request_state(state_id: str, upscale: int, images: int = 1) -> RequestState:
    return RequestState(id=state_id, request=GenerateRequest(
        prompt=f"prompt {state_id}", seed=1, width=64, height=64, steps=2, num_images=images,
        postprocess={"upscale": upscale}))


def stored_size(tmp_path: Path, key: str) -> tuple[int, int]:
    return Image.open(io.BytesIO((tmp_path / key).read_bytes())).size


class DeviceUpscaler:
    """Stands in for a super-resolution model: records its calls, nearest-neighbour x factor."""

    runs_on_device = True

    def __init__(self, fail: bool = False) -> None:
        self.calls: list[list[int]] = []
        self.fail = fail

    def upscale(self, images: Sequence[Image.Image], factors: Sequence[int]) -> list[Image.Image]:
        self.calls.append(list(factors))
        if self.fail:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return [im.resize((im.width * f, im.height * f), Image.Resampling.NEAREST)
                for im, f in zip(images, factors)]


def test_lanczos_upscale_enlarges_stored_images_and_results(tmp_path: Path) -> None:
    pipe = BatchPipeline(SyntheticEngine(), LocalStorage(tmp_path), "http://x", "m")
    assert isinstance(pipe.upscaler, LanczosUpscaler)
    out = pipe.run([request_state("a", 2, images=2), request_state("b", 1), request_state("c", 4)])
    sizes = {jid: [(im.width, im.height) for im in o.result.images] for jid, o in out.items()}
    assert sizes == {"a": [(128, 128), (128, 128)], "b": [(64, 64)], "c": [(256, 256)]}
    assert stored_size(tmp_path, "a/1.png") == (128, 128)
    assert stored_size(tmp_path, "c/0.png") == (256, 256)
    assert stored_size(tmp_path, "b/0.png") == (64, 64)


def test_device_upscaler_runs_once_per_batch_after_the_engine(tmp_path: Path) -> None:
    up = DeviceUpscaler()
    pipe = BatchPipeline(SyntheticEngine(), LocalStorage(tmp_path), "http://x", "m", upscaler=up)
    output = pipe.draw([request_state("a", 2, images=2), request_state("b", 1), request_state("c", 4)])
    assert up.calls == [[2, 2, 4]]  # one call, only the images that ask for it
    assert output.outcomes["a"].images[0].size == (128, 128)  # enlarged before the finisher
    out = pipe.finish(output)
    assert [im.width for im in out["c"].result.images] == [256]
    assert [im.width for im in out["b"].result.images] == [64]
    assert up.calls == [[2, 2, 4]]  # the finisher does not enlarge again


def test_device_upscaler_failure_fails_only_the_jobs_that_asked(tmp_path: Path) -> None:
    engine = SyntheticEngine()
    calls = []
    generate = engine.generate
    engine.generate = lambda spec, on_step=None: calls.append(spec) or generate(spec, on_step)  # type: ignore[method-assign]
    pipe = BatchPipeline(engine, LocalStorage(tmp_path), "http://x", "m", upscaler=DeviceUpscaler(fail=True))
    out = pipe.run([request_state("a", 2), request_state("b", 1)])
    assert out["b"].result is not None
    assert out["a"].result is None and "upscaling failed" in str(out["a"].error)
    assert len(calls) == 1  # the engine did not run again for the failed upscale


def test_settings_choose_lanczos_by_default() -> None:
    from imagegenx.settings import Settings
    from imagegenx.upscale import load_upscaler

    assert isinstance(load_upscaler(Settings().upscaler_model), LanczosUpscaler)


@pytest.mark.parametrize("upscale", [3, 8, 0])
def test_request_rejects_other_factors(upscale: int) -> None:
    with pytest.raises(ValueError, match="upscale"):
        GenerateRequest(prompt="x", postprocess={"upscale": upscale})


def test_device_upscaler_out_of_memory_retries_once_per_request(tmp_path: Path) -> None:
    class OutOfMemoryError(RuntimeError):
        """Matched by name, like torch's."""

    class Tight(DeviceUpscaler):
        def upscale(self, images: Sequence[Image.Image], factors: Sequence[int]) -> list[Image.Image]:
            if len(images) > 2:
                self.calls.append(list(factors))
                raise OutOfMemoryError("CUDA out of memory")
            return super().upscale(images, factors)

    up = Tight()
    pipe = BatchPipeline(SyntheticEngine(), LocalStorage(tmp_path), "http://x", "m", upscaler=up)
    out = pipe.run([request_state("a", 2, images=2), request_state("b", 4), request_state("c", 2, images=3)])
    assert up.calls == [[2, 2, 4, 2, 2, 2], [2, 2], [4], [2, 2, 2]]
    assert [im.width for im in out["a"].result.images] == [128, 128]
    assert [im.width for im in out["b"].result.images] == [256]
    assert out["c"].result is None and "out of memory" in str(out["c"].error)
