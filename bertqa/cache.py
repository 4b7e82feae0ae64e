"""The windows of a run: its examples (`bertqa.sources`) tokenized and labelled once and cached on disk, so a rerun
(or every process of a multi-process run) does not tokenize again.

Windows are stored as flat arrays (see `bertqa.features`), one `.npy` file each, memory-mapped when read. The cache
key covers everything the windows depend on: the examples (ids, questions, contexts, answers), the tokenizer's full
definition, the window settings, whether labels are included, and `FORMAT`, which changes whenever the windowing
code changes what it produces.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bertqa.data import Example, Features, Window, label_features, tokenize_examples
from bertqa.sources import RunExamples

__all__ = [
    "FORMAT",
    "RunData",
    "cached_features",
    "features_key",
    "prepare_data",
    "read_entry",
    "write_entry",
]

FORMAT = 2  # 2: flat .npy arrays with a checksummed manifest (1 was a pickle of Python lists)
logger = logging.getLogger("bertqa")


def features_key(examples: Sequence[Example], tokenizer: Any, window: Window, *, labelled: bool) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"format": FORMAT, "labelled": labelled, **window.to_dict()}, sort_keys=True).encode())
    # The tokenizer's definition without its truncation/padding state, which its last call leaves behind.
    spec = {
        k: v for k, v in json.loads(tokenizer.backend_tokenizer.to_str()).items() if k not in ("truncation", "padding")
    }
    h.update(json.dumps(spec, sort_keys=True).encode())
    contexts: dict[int, bytes] = {}  # the questions of one paragraph share its context object: hash it once
    for ex in examples:
        if id(ex.context) not in contexts:
            contexts[id(ex.context)] = hashlib.sha256(ex.context.encode()).digest()
        parts = (ex.id, ex.question, *ex.answer_texts, *map(str, ex.answer_starts), str(ex.is_impossible))
        h.update("\x1f".join(parts).encode())
        h.update(contexts[id(ex.context)])
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

    An entry is a folder of `.npy` arrays, memory-mapped when read (the processes of a machine share the pages),
    and a manifest with each array's shape, type and CRC-32, written last: an entry that does not match its
    manifest is rebuilt with a warning, never used. `num_proc` is not part of the key: any number of tokenizing
    processes gives the same windows.
    """
    if cache_dir is None:
        return _build(examples, tokenizer, window, labelled=labelled, num_proc=num_proc)
    folder = Path(cache_dir).expanduser() / f"windows-{features_key(examples, tokenizer, window, labelled=labelled)}"
    features = read_entry(folder)
    if features is None:
        features = _build(examples, tokenizer, window, labelled=labelled, num_proc=num_proc)
        write_entry(folder, features)
    return features


def _build(examples: Sequence[Example], tokenizer: Any, window: Window, *, labelled: bool, num_proc: int) -> Features:
    features = tokenize_examples(examples, tokenizer, window, num_proc=num_proc)
    return label_features(features, examples) if labelled else features


def write_entry(folder: Path, features: Features) -> None:
    """Save `features` as a cache entry: written to a temporary folder, then renamed (readers see all or nothing)."""
    tmp = folder.with_name(f"{folder.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    manifest = {}
    for name, array in features.arrays().items():
        array = np.ascontiguousarray(array)
        np.save(tmp / f"{name}.npy", array)
        manifest[name] = {"shape": list(array.shape), "dtype": array.dtype.str, "crc32": zlib.crc32(array)}
    (tmp / "manifest.json").write_text(json.dumps(manifest))
    try:
        os.replace(tmp, folder)
    except OSError:  # another process wrote the same entry first: theirs is as good
        shutil.rmtree(tmp, ignore_errors=True)


def read_entry(folder: Path) -> Features | None:
    """The cached windows in `folder`, memory-mapped; None when there is no entry or it is damaged (then removed)."""
    manifest = folder / "manifest.json"
    if not manifest.is_file():
        return None
    try:
        arrays = {}
        for name, entry in json.loads(manifest.read_text()).items():
            array = np.load(folder / f"{name}.npy", mmap_mode="r")
            if list(array.shape) != entry["shape"] or array.dtype.str != entry["dtype"]:
                raise ValueError(f"{name}.npy holds {array.dtype.str}{list(array.shape)}, not what the manifest says")
            if zlib.crc32(array) != entry["crc32"]:
                raise ValueError(f"{name}.npy does not match its checksum")
            arrays[name] = array
        return Features.from_arrays(arrays)
    except (OSError, ValueError, KeyError, TypeError) as err:
        logger.warning("window cache entry %s is damaged (%s): rebuilding it", folder, err)
        shutil.rmtree(folder, ignore_errors=True)
        return None


@dataclass(frozen=True)
class RunData:
    """The examples of a run and their windows: labelled for training, plain for evaluation and calibration."""

    examples: RunExamples
    train_features: Features
    eval_features: Features
    calibration_features: Features | None = None  # SQuAD v2: the windows of `examples.calibration`


def prepare_data(
    examples: RunExamples, tokenizer: Any, *, window: Window, cache_dir: str | Path | None, num_proc: int = 1
) -> RunData:
    """The windows of a run's examples, each set read from `cache_dir` when it was tokenized before.

    `fit` and the Trainer baseline both call this on the same `bertqa.sources.run_examples`, so the two can only
    ever see the same data.
    """
    windows = {"window": window, "cache_dir": cache_dir, "num_proc": num_proc}
    calibration = examples.calibration
    return RunData(
        examples,
        cached_features(examples.train, tokenizer, labelled=True, **windows),
        cached_features(examples.eval, tokenizer, labelled=False, **windows),
        cached_features(calibration, tokenizer, labelled=False, **windows) if calibration else None,
    )
