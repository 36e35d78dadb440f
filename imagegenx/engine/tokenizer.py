"""CLIP's BPE tokenizer, built offline from the vendored merges file.

Stable Diffusion 1.x conditions on CLIP ViT-L/14 text features, so prompts must
be split into exactly the token ids CLIP was trained with. The merges ship with
the package (``assets/bpe_simple_vocab_16e6.txt.gz``, see
``assets/LICENSE-CLIP-BPE.txt``), which lets us write a ``tokenizer/`` folder
that ``CLIPTokenizer.from_pretrained`` loads without reaching a model hub.
"""
from __future__ import annotations

import gzip
import json
from functools import lru_cache
from pathlib import Path

from transformers import CLIPTokenizer

BPE_MERGES_PATH = Path(__file__).parent / "assets" / "bpe_simple_vocab_16e6.txt.gz"

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
MAX_LENGTH = 77  # CLIP's context length; the text encoder has 77 positions.
VOCAB_SIZE = 49408
# CLIP keeps the first 49152 - 256 - 2 merges so that bytes (256), their
# end-of-word forms (256), the merges and the two specials total 49408.
_N_MERGES = 49152 - 256 - 2


def bytes_to_unicode() -> dict[int, str]:
    """Map every byte to a printable character, as byte-level BPE requires.

    Printable latin-1 bytes map to themselves; the remaining bytes (controls,
    space, ...) map to code points from 256 upwards, in byte order. The
    resulting order is also the order of the first 256 vocabulary entries.
    """
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return {b: mapping[b] for b in printable + [b for b in range(256) if b not in printable]}


@lru_cache(maxsize=1)
def clip_vocab_and_merges() -> tuple[dict[str, int], tuple[str, ...]]:
    """Return CLIP's token->id vocabulary and its ordered merge rules.

    The order of the vocabulary defines the ids, so it follows CLIP's own
    construction: byte symbols, byte symbols + ``</w>``, one entry per merge,
    then the start/end specials.
    """
    with gzip.open(BPE_MERGES_PATH, "rt", encoding="utf-8") as fh:
        lines = fh.read().split("\n")
    merges = tuple(lines[1 : _N_MERGES + 1])  # the first line is a header
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols]
    tokens += ["".join(m.split()) for m in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE:
        raise ValueError(f"CLIP vocabulary has {len(vocab)} entries, expected {VOCAB_SIZE}")
    return vocab, merges


def write_clip_tokenizer(path: Path) -> Path:
    """Write a ``CLIPTokenizer.from_pretrained``-loadable folder at ``path``.

    Only the slow-format files (vocab.json + merges.txt) and the configs are
    written; transformers builds the fast tokenizer from them at load time.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    vocab, merges = clip_vocab_and_merges()
    (path / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    specials = {
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "unk_token": EOS_TOKEN,
        "pad_token": EOS_TOKEN,
    }
    (path / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": MAX_LENGTH,
        "do_lower_case": True,
        "errors": "replace",
        "add_prefix_space": False,
        **specials,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return path


def load_clip_tokenizer(path: Path) -> CLIPTokenizer:
    """Load a folder written by :func:`write_clip_tokenizer` (local files only).

    ``from_pretrained`` is used on purpose: constructing ``CLIPTokenizer``
    directly from file paths does not read them in current transformers.
    """
    tok = CLIPTokenizer.from_pretrained(str(path), local_files_only=True)
    tok.model_max_length = MAX_LENGTH
    return tok
