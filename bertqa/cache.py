"""The windows of a run: the examples a config names, tokenized and labelled once and cached on disk, so a rerun
(or every process of a multi-process run) does not tokenize again.

The cache key covers everything the windows depend on: the examples (ids, questions, contexts, answers), the tokenizer's
full definition, the window settings, whether labels are included, and `FORMAT`, which changes whenever the
windowing code changes what it produces.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bertqa.data import (
    Example,
    Features,
    LoadReport,
    Window,
    hold_out,
    label_features,
    load_examples,
    subsample,
    tokenize_examples,
)
from bertqa.loading import as_examples

if TYPE_CHECKING:
    from bertqa.config import TrainConfig

__all__ = ["FORMAT", "RunData", "cached_features", "eval_source", "features_key", "prepare_data"]

FORMAT = 1


def features_key(examples: Sequence[Example], tokenizer: Any, window: Window, *, labelled: bool) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"format": FORMAT, "labelled": labelled, **window.to_dict()}, sort_keys=True).encode())
    h.update(tokenizer.backend_tokenizer.to_str().encode())
    for ex in examples:
        parts = (ex.id, ex.question, ex.context, *ex.answer_texts, *map(str, ex.answer_starts), str(ex.is_impossible))
        h.update("\x1f".join(parts).encode())
        h.update(b"\x1e")
    return h.hexdigest()[:32]


def cached_features(
    examples: Sequence[Example],
    tokenizer: Any,
    window: Window,
    *,
    cache_dir: str | Path | None,
    labelled: bool,
    num_proc: int = 1,
) -> Features:
    """`tokenize_examples` (+ `label_features` when `labelled`), read from `cache_dir` when it was done before.

    `num_proc` is not part of the key: any number of tokenizing processes gives the same windows.
    """

    def build() -> Features:
        features = tokenize_examples(examples, tokenizer, window, num_proc=num_proc)
        return label_features(features, examples) if labelled else features

    if cache_dir is None:
        return build()
    path = Path(cache_dir).expanduser() / f"windows-{features_key(examples, tokenizer, window, labelled=labelled)}.pkl"
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


@dataclass(frozen=True)
class RunData:
    """The examples and windows a run trains and evaluates on, and what loading them found."""

    train_examples: Sequence[Example]
    eval_examples: Sequence[Example]
    train_features: Features
    eval_features: Features
    reports: tuple[LoadReport, ...] = ()
    eval_source: str = ""  # where the evaluation examples came from, in words


def eval_source(train_data: str, eval_data: str | None, eval_split: float | None) -> str | float:
    """The evaluation data a config means: a source, or the share of the training data to hold out.

    Unset, it is the bundled dev-v1.1 for the bundled train-v1.1 (the usual SQuAD setup), and a held-out tenth of
    the training data for anything else: a user's own data is not scored against SQuAD unless asked to be.
    """
    if eval_data is not None:
        return eval_data
    if eval_split is not None:
        return eval_split
    return "dev-v1.1" if train_data == "train-v1.1" else 0.1


def prepare_data(
    config: TrainConfig,
    tokenizer: Any,
    *,
    train_examples: Sequence[Example] | Any | None = None,
    eval_examples: Sequence[Example] | Any | None = None,
) -> RunData:
    """The examples and windows that `config` trains and evaluates on; examples passed in (a list of `Example`s or a
    `datasets.Dataset` of records) are used as given.

    `fit` and the Trainer baseline script both call this, so the two can only ever see the same data.
    """
    options = {"answerable": config.answerable_only, "seed": config.seed, "column_map": config.column_map}
    reports, given = [], (train_examples is not None, eval_examples is not None)
    if train_examples is None:
        train_examples, report = load_examples(config.train_data, **options)
        reports.append(report)
    train_examples = as_examples(train_examples, column_map=config.column_map)
    source = eval_source(config.train_data, config.eval_data, config.eval_split)
    if eval_examples is not None:
        eval_examples, described = as_examples(eval_examples, column_map=config.column_map), "given examples"
    elif isinstance(source, float):
        train_examples, eval_examples = hold_out(train_examples, source, seed=config.seed)
        described = f"{source:.0%} of the training data held out ({len(eval_examples):,} questions)"
    else:
        eval_examples, report = load_examples(source, **options)
        reports.append(report)
        described = str(source)
    if not given[0]:
        train_examples = subsample(train_examples, config.max_train_examples, seed=config.seed)
    if not given[1]:
        eval_examples = subsample(eval_examples, config.max_eval_examples, seed=config.seed)
    windows = {"window": config.window, "cache_dir": config.cache_dir, "num_proc": config.tokenize_workers}
    return RunData(
        train_examples,
        eval_examples,
        cached_features(train_examples, tokenizer, labelled=True, **windows),
        cached_features(eval_examples, tokenizer, labelled=False, **windows),
        tuple(reports),
        described,
    )
