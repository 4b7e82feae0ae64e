"""A disk cache for tokenized windows, so a rerun (or every process of a multi-process run) tokenizes only once.

The key covers everything the windows depend on: the examples (ids, questions, contexts, answers), the tokenizer's
full definition, the window settings, whether labels are included, and `FORMAT`, which changes whenever the
windowing code changes what it produces.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bertqa.data import Example, Features, label_features, tokenize_examples

__all__ = ["FORMAT", "cached_features", "features_key"]

FORMAT = 1


def features_key(examples: Sequence[Example], tokenizer: Any, *, labelled: bool, **window: int) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"format": FORMAT, "labelled": labelled, **window}, sort_keys=True).encode())
    h.update(tokenizer.backend_tokenizer.to_str().encode())
    for ex in examples:
        parts = (ex.id, ex.question, ex.context, *ex.answer_texts, *map(str, ex.answer_starts), str(ex.is_impossible))
        h.update("\x1f".join(parts).encode())
        h.update(b"\x1e")
    return h.hexdigest()[:32]


def cached_features(
    examples: Sequence[Example],
    tokenizer: Any,
    *,
    cache_dir: str | Path | None,
    labelled: bool,
    max_seq_length: int,
    doc_stride: int,
    max_query_length: int,
    num_proc: int = 1,
) -> Features:
    """`tokenize_examples` (+ `label_features` when `labelled`), read from `cache_dir` when it was done before.

    `num_proc` is not part of the key: any number of tokenizing processes gives the same windows.
    """
    window = {"max_seq_length": max_seq_length, "doc_stride": doc_stride, "max_query_length": max_query_length}

    def build() -> Features:
        features = tokenize_examples(examples, tokenizer, num_proc=num_proc, **window)
        return label_features(features, examples) if labelled else features

    if cache_dir is None:
        return build()
    path = (
        Path(cache_dir).expanduser() / f"windows-{features_key(examples, tokenizer, labelled=labelled, **window)}.pkl"
    )
    if path.is_file():
        try:
            with open(path, "rb") as f:
                return pickle.load(f)
        except (OSError, pickle.UnpicklingError, EOFError, AttributeError):
            path.unlink(missing_ok=True)  # a damaged entry is rebuilt, never trusted
    features = build()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        pickle.dump(features, f, protocol=pickle.HIGHEST_PROTOCOL)
    os.replace(tmp, path)  # readers see the whole file or none
    return features
