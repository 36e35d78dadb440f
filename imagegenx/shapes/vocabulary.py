"""The words the shipped shapes model learnt, and a warning for prompts using others.

Its training captions are one grammar (``captions.caption``); a word outside it
("cat", "Paris") has no meaning to the model, which then draws a shape anyway. The
result says so instead of returning that picture without comment.
"""
from __future__ import annotations

import re

from imagegenx.shapes.captions import COLOURS, POSITIONS, SHAPES, SIZES

WORDS = frozenset({"a", "an", "at", "the", "in", "on", "background", *COLOURS, *SHAPES, *SIZES,
                   *(word for position in POSITIONS for word in position.split())})


def unseen_words(prompt: str) -> list[str]:
    """The prompt's words that no training caption holds, in order, each once."""
    return list(dict.fromkeys(w for w in re.findall(r"[a-z]+", prompt.lower()) if w not in WORDS))


def prompt_warnings(prompt: str) -> list[str]:
    """One warning naming the unseen words, or none."""
    unseen = unseen_words(prompt)
    if not unseen:
        return []
    named = ", ".join(repr(w) for w in unseen)
    return [f"the shapes model never saw the word{'s' if len(unseen) > 1 else ''} {named}: it draws "
            "one coloured circle, square or triangle on a coloured background and leaves "
            f"{'them' if len(unseen) > 1 else 'it'} out (docs/SHAPES.md)"]
