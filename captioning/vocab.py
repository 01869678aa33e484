"""Tokenisation and the word <-> id vocabulary, stored in checkpoints as a plain list of words.

Free of torch, so that the ONNX engine (captioning/export/runtime.py) shares it."""

from __future__ import annotations

import itertools
import re
from collections import Counter
from typing import Any, Iterable, Sequence

from captioning.console import InvalidValue

PAD, START, END, UNK = "<pad>", "<start>", "<end>", "<unk>"
SPECIALS = (PAD, START, END, UNK)

_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


def tokenize(text: str) -> list[str]:
    """Lowercase words and numbers; punctuation dropped (as in Karpathy's split files)."""
    return _WORD.findall(text.lower())


class Vocabulary:
    """ids 0..3 are <pad>, <start>, <end>, <unk>; then words, most frequent first."""

    def __init__(self, words: Sequence[str]) -> None:
        if not isinstance(words, (list, tuple)):  # e.g. a damaged vocab.json: one line, never a traceback
            raise InvalidValue(f"a vocabulary is a list of words, not a {type(words).__name__}")
        words = list(words)
        odd = [w for w in words if not isinstance(w, str)]
        if odd:
            raise InvalidValue(f"a vocabulary's words are strings, not {odd[0]!r}")
        if tuple(words[:4]) != SPECIALS:
            raise InvalidValue(f"a vocabulary must start with {SPECIALS}, got {words[:4]}")
        if len(set(words)) != len(words):
            raise InvalidValue("a vocabulary must not repeat words")
        self.words = words
        self.index = {w: i for i, w in enumerate(words)}

    pad_id, start_id, end_id, unk_id = 0, 1, 2, 3

    @classmethod
    def build(cls, captions: Iterable[str], min_count: int) -> "Vocabulary":
        counts = Counter(tok for caption in captions for tok in tokenize(caption))
        kept = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
        return cls(list(SPECIALS) + kept)

    def __len__(self) -> int:
        return len(self.words)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocabulary) and self.words == other.words

    def encode(self, caption: str, max_len: int) -> list[int]:
        """<start> w_1 .. w_k <end>, with k <= max_len (longer captions are truncated)."""
        ids = [self.index.get(tok, self.unk_id) for tok in tokenize(caption)[:max_len]]
        return [self.start_id, *ids, self.end_id]

    def decode(self, ids: Sequence[int] | Any) -> list[str]:
        """Words up to (excluding) the first <end>; <start> and <pad> are skipped. ``ids``: a
        sequence of ints, or a 1-D tensor or array."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        spoken = itertools.takewhile(lambda i: i != self.end_id, ids)
        return [self.words[i] for i in spoken if i not in (self.pad_id, self.start_id)]


def banned_ids(n_words: int, min_len: int = 0, no_unk: bool = False) -> list[int]:
    """Word ids a decoder may not emit after ``n_words`` words: never <pad> or <start>; not <end>
    before ``min_len`` words; not <unk> with ``no_unk``. Every decoding loop (greedy, sampling and
    beam search, in PyTorch and in the ONNX engine) sets these log-probabilities to -inf."""
    banned = [Vocabulary.pad_id, Vocabulary.start_id]
    if n_words < min_len:
        banned.append(Vocabulary.end_id)
    if no_unk:
        banned.append(Vocabulary.unk_id)
    return banned
