"""Tokenization for the text tasks: a word vocabulary built from the training split only.

``basic_english``-style tokens (lower-case runs of letters/digits), ids ``0`` = padding,
``1`` = out-of-vocabulary, then the ``max_size - 2`` most frequent training tokens (ties
broken alphabetically, so every node builds the same vocabulary).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable

import numpy as np

PAD, UNK = 0, 1
_TOKEN = re.compile(r"[a-z0-9]+")


def tokenize(text: str) -> list[str]:
    """Lower-case word tokens of ``text``."""
    return _TOKEN.findall(text.lower())


def build_vocab(texts: Iterable[str], max_size: int) -> dict[str, int]:
    """Token -> id for the ``max_size - 2`` most frequent tokens of ``texts``."""
    counts = Counter(tok for text in texts for tok in tokenize(text))
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[: max(max_size - 2, 0)]
    return {tok: i + 2 for i, (tok, _) in enumerate(ranked)}


def encode(texts: Iterable[str], vocab: dict[str, int], length: int) -> np.ndarray:
    """``[M, length]`` int64 token ids, truncated or padded with ``PAD``."""
    rows = [[vocab.get(tok, UNK) for tok in tokenize(text)][:length] for text in texts]
    out = np.full((len(rows), length), PAD, dtype=np.int64)
    for i, ids in enumerate(rows):
        out[i, : len(ids)] = ids
    return out
