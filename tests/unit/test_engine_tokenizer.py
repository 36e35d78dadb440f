"""The offline CLIP tokenizer must reproduce CLIP's token ids exactly."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from imagegenx.engine.tokenizer import (
    BOS_TOKEN,
    EOS_TOKEN,
    MAX_LENGTH,
    VOCAB_SIZE,
    bytes_to_unicode,
    clip_vocab_and_merges,
    load_clip_tokenizer,
    write_clip_tokenizer,
)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_clip_tokenizer(tmp_path_factory.mktemp("tokenizer"))


def test_bytes_to_unicode_is_a_bijection_of_all_bytes() -> None:
    mapping = bytes_to_unicode()
    assert sorted(mapping) == list(range(256))
    assert len(set(mapping.values())) == 256
    assert list(mapping)[:3] == [ord("!"), ord('"'), ord("#")]


def test_vocabulary_follows_clip_order() -> None:
    vocab, merges = clip_vocab_and_merges()
    assert len(vocab) == VOCAB_SIZE
    assert len(merges) == 49152 - 256 - 2
    assert vocab["!"] == 0
    assert vocab["!</w>"] == 256
    assert vocab["in"] == 512  # the first merge rule is "i n"
    assert vocab[BOS_TOKEN] == 49406
    assert vocab[EOS_TOKEN] == 49407


def test_folder_has_the_files_from_pretrained_reads(tokenizer_dir: Path) -> None:
    names = {p.name for p in tokenizer_dir.iterdir()}
    assert {"vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"} <= names
    config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    assert config["model_max_length"] == MAX_LENGTH


def test_known_clip_ids(tokenizer_dir: Path) -> None:
    tok = load_clip_tokenizer(tokenizer_dir)
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    # CLIP lower-cases and collapses whitespace before splitting.
    assert tok("A  Photo of a CAT").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_model_max_length_pads_and_truncates_to_77(tokenizer_dir: Path) -> None:
    tok = load_clip_tokenizer(tokenizer_dir)
    assert tok.model_max_length == MAX_LENGTH == 77
    assert len(tok) == VOCAB_SIZE
    padded = tok("a cat", padding="max_length", max_length=tok.model_max_length, truncation=True).input_ids
    assert len(padded) == 77
    assert padded[:4] == [49406, 320, 2368, 49407]
    assert set(padded[4:]) == {49407}  # SD1.x pads with the end token
    long = tok("cat " * 200, padding="max_length", max_length=77, truncation=True).input_ids
    assert len(long) == 77 and long[0] == 49406 and long[-1] == 49407
