"""Prompts the shipped shapes model cannot draw: the result names the words it never saw."""
from __future__ import annotations

from pathlib import Path

from imagegenx.engine.synthetic import SyntheticEngine
from imagegenx.pipeline import BatchPipeline
from imagegenx.request_state import RequestState
from imagegenx.schemas import GenerateRequest
from imagegenx.settings import Settings
from imagegenx.shapes.captions import evaluation_prompts
from imagegenx.shapes.model_files import is_shipped_shapes_model
from imagegenx.shapes.vocabulary import prompt_warnings, unseen_words
from imagegenx.storage import LocalStorage


def test_words_outside_the_captions_are_named_once_in_order() -> None:
    assert unseen_words("a cat riding a bicycle in Paris, a cat!") == ["cat", "riding", "bicycle", "paris"]
    assert unseen_words("A small Red circle at the top left on a blue background.") == []
    assert not any(unseen_words(p) for p in evaluation_prompts(200, held_out=False))
    assert prompt_warnings("a red circle on a blue background") == []
    assert prompt_warnings("a red dog") == [
        "the shapes model never saw the word 'dog': it draws one coloured circle, square or "
        "triangle on a coloured background and leaves it out (docs/SHAPES.md)"]


def test_the_pipeline_puts_the_warning_in_the_result(tmp_path: Path) -> None:
    def run(pipe: BatchPipeline) -> list[str]:
        req = GenerateRequest(prompt="a cat in Paris", seed=1, width=64, height=64, steps=2)
        return pipe.run([RequestState(id="a", request=req)])["a"].result.warnings  # type: ignore[union-attr]

    storage = LocalStorage(tmp_path)
    assert run(BatchPipeline(SyntheticEngine(), storage, "http://x", "shapes",
                             prompt_warnings=prompt_warnings)) == prompt_warnings("cat paris")
    assert run(BatchPipeline(SyntheticEngine(), storage, "http://x", "m")) == []  # other models: no check


def test_only_the_shipped_model_is_checked(clean_env: None, tmp_path: Path) -> None:
    assert is_shipped_shapes_model(Settings().model)
    assert not is_shipped_shapes_model(tmp_path / "shapes")
