"""The windows of a run: its examples (`bertqa.sources`) tokenized and labelled once and cached on disk, so a rerun
(or every process of a multi-process run) does not tokenize again.

Windows are stored as flat arrays (see `bertqa.features`), one `.npy` file each, memory-mapped when read. The cache
key covers everything the windows depend on: the examples (ids, questions, contexts, answers), the tokenizer's full
definition, the window settings, whether labels are included, and `FORMAT`, which changes whenever the windowing
code changes what it produces.

Runs that share a cache are safe together: an entry is written under a temporary name and renamed, so it is read
whole or not at all, and a file lock beside it makes a second run that wants the same entry wait for the first
instead of tokenizing again. A cache folder that cannot be written (read-only, no permission) is used for reading
only, with one warning; an entry that does not fit on a full disk is dropped with a warning. Either way the run
goes on with its windows in memory.
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
from functools import partial
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

FORMAT = 3  # 3: exact context offsets for every tokenizer family; 2: flat .npy arrays; 1: a pickle of Python lists
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
    write: bool = True,
) -> Features:
    """`tokenize_examples` (+ `label_features` when `labelled`), read from `cache_dir` when it was done before.

    An entry is a folder of `.npy` arrays, memory-mapped when read (the processes of a machine share the pages),
    and a manifest with each array's shape, type and CRC-32, written last: an entry that does not match its
    manifest is rebuilt with a warning, never used. `num_proc` is not part of the key: any number of tokenizing
    processes gives the same windows. Without `write` (a cache that cannot be written) entries are only read.
    """
    build = partial(_build, examples, tokenizer, window, labelled=labelled, num_proc=num_proc)
    if cache_dir is None:
        return build()
    folder = Path(cache_dir).expanduser() / f"windows-{features_key(examples, tokenizer, window, labelled=labelled)}"
    features = read_entry(folder)
    if features is not None or not write:
        return features if features is not None else build()
    from filelock import FileLock, Timeout

    lock = FileLock(folder.with_name(f".{folder.name}.lock"))  # hidden: not an entry
    try:
        try:
            lock.acquire(timeout=0)
        except Timeout:
            logger.info("waiting for another process that is writing window cache entry %s", folder)
            lock.acquire()
    except OSError as err:  # the lock file cannot be made: nobody can have written the entry here either
        logger.warning(
            "window cache %s cannot be written (%s): the windows are kept in memory for this run",
            folder.parent,
            err.strerror or err,
        )
        return build()
    try:
        features = read_entry(folder)  # the process this one waited for may have written it
        if features is None:
            for stale in folder.parent.glob(f"{folder.name}.*.tmp"):  # a writer stopped mid-write (the lock is ours)
                shutil.rmtree(stale, ignore_errors=True)
            features = build()
            write_entry(folder, features)
        return features
    finally:
        lock.release()


def _build(examples: Sequence[Example], tokenizer: Any, window: Window, *, labelled: bool, num_proc: int) -> Features:
    features = tokenize_examples(examples, tokenizer, window, num_proc=num_proc)
    return label_features(features, examples) if labelled else features


def write_entry(folder: Path, features: Features) -> bool:
    """Save `features` as a cache entry: written to a temporary folder, then renamed (readers see all or nothing).
    A write that fails (a full disk, a folder that turned read-only) is removed with a warning, and False returned:
    the windows in memory are as good, only the next run tokenizes again."""
    tmp = folder.with_name(f"{folder.name}.{os.getpid()}.tmp")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        manifest = {}
        for name, array in features.arrays().items():
            array = np.ascontiguousarray(array)
            np.save(tmp / f"{name}.npy", array)
            manifest[name] = {"shape": list(array.shape), "dtype": array.dtype.str, "crc32": zlib.crc32(array)}
        (tmp / "manifest.json").write_text(json.dumps(manifest))
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        free = shutil.disk_usage(folder.parent).free / 2**20
        logger.warning(
            "window cache entry %s could not be written (%s; %.1f MiB free there): going on without it",
            folder,
            err.strerror or err,
            free,
        )
        return False
    except BaseException:  # Ctrl-C or SIGTERM mid-write: leave no half entry behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        os.replace(tmp, folder)
    except OSError:  # another process wrote the same entry first: theirs is as good
        shutil.rmtree(tmp, ignore_errors=True)
    return True


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
    """The windows of a run's examples, each set read from `cache_dir` when it was tokenized before. A cache that
    cannot be written is said once and only read.

    `fit` and the Trainer baseline both call this on the same `bertqa.sources.run_examples`, so the two can only
    ever see the same data.
    """
    write = cache_dir is not None and _writable(Path(cache_dir).expanduser())
    windows = {"window": window, "cache_dir": cache_dir, "num_proc": num_proc, "write": write}
    calibration = examples.calibration
    return RunData(
        examples,
        cached_features(examples.train, tokenizer, labelled=True, **windows),
        cached_features(examples.eval, tokenizer, labelled=False, **windows),
        cached_features(calibration, tokenizer, labelled=False, **windows) if calibration else None,
    )


def _writable(folder: Path) -> bool:
    """Whether cache entries can be written into `folder` (made if needed); a warning, once, when not."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
        return True
    except OSError as err:
        logger.warning(
            "window cache %s cannot be written (%s): entries already there are read, and windows not "
            "there are kept in memory for this run only (--cache-dir elsewhere, or none)",
            folder,
            err.strerror or err,
        )
        return False
