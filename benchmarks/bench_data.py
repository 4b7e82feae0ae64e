"""Measure the data pipeline on the bundled SQuAD train set: tokenizing, reading cached windows, and memory.

  python benchmarks/bench_data.py                       # everything below, on all 87,599 train questions (~6 min)
  python benchmarks/bench_data.py --skip-memory         # only the tokenize and cache timings
  python benchmarks/bench_data.py --skip-memory --datasets-map   # and the same windows made with datasets.map

Prints one JSON line:
- tokenize_s: windows for the whole train set, one process, no cache;
- cache_write_s / cache_read_s: writing the cache entry, and having the windows back from it (a warm cache);
- peak_rss_all_mb / peak_rss_500_mb: peak resident memory of a one-step `train.py` run (batch size 1) on all the
  train questions and on 500 of them (each run once to fill the cache, then measured), and their difference: what
  the examples and windows of the whole train set add to a training process.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bertqa.cli import run, setup_logging

ROOT = Path(__file__).resolve().parent.parent


def timings(cache_dir: Path) -> dict[str, float]:
    from bertqa.cache import cached_features
    from bertqa.data import Window
    from bertqa.model import build_tokenizer
    from bertqa.sources import load_examples

    tokenizer = build_tokenizer("minilm-l6")
    examples, _ = load_examples("train-v1.1")
    t0 = time.perf_counter()
    cached_features(examples, tokenizer, Window(), cache_dir=None, labelled=True)
    t1 = time.perf_counter()
    cached_features(examples, tokenizer, Window(), cache_dir=cache_dir, labelled=True)  # tokenize again + write
    t2 = time.perf_counter()
    features = cached_features(examples, tokenizer, Window(), cache_dir=cache_dir, labelled=True)
    t3 = time.perf_counter()
    return {
        "examples": len(examples),
        "windows": len(features),
        "tokenize_s": round(t1 - t0, 2),
        "cache_write_s": round(t2 - t1 - (t1 - t0), 2),
        "cache_read_s": round(t3 - t2, 3),
    }


def datasets_map(cache_dir: Path) -> dict[str, float]:
    """The same windows made with `datasets.map(batched=True)` into an Arrow file, and read back as flat arrays."""
    import datasets
    import numpy as np

    from bertqa.data import Window, _cut_questions
    from bertqa.model import build_tokenizer
    from bertqa.sources import load_examples

    tokenizer, window = build_tokenizer("minilm-l6"), Window()
    examples, _ = load_examples("train-v1.1")

    def windows(batch: dict[str, list]) -> dict[str, list]:
        questions, _ = _cut_questions([q.lstrip() for q in batch["question"]], tokenizer, window.max_query_length)
        enc = tokenizer(
            questions,
            batch["context"],
            truncation="only_second",
            max_length=window.max_seq_length,
            stride=window.doc_stride,
            return_overflowing_tokens=True,
            return_offsets_mapping=True,
        )
        offsets = [
            [o if s == 1 else (-1, -1) for o, s in zip(offs, enc.sequence_ids(i))]
            for i, offs in enumerate(enc["offset_mapping"])
        ]
        return {
            "input_ids": enc["input_ids"],
            "token_type_ids": enc["token_type_ids"],
            "offsets": offsets,
            "example": enc["overflow_to_sample_mapping"],
        }

    t0 = time.perf_counter()
    rows = datasets.Dataset.from_dict(
        {"question": [ex.question for ex in examples], "context": [ex.context for ex in examples]}
    )
    arrow = str(cache_dir / "map.arrow")
    rows.map(windows, batched=True, batch_size=1000, remove_columns=rows.column_names, cache_file_name=arrow)
    t1 = time.perf_counter()
    table = datasets.Dataset.from_file(arrow).data
    ids = np.asarray(table.column("input_ids").combine_chunks().values)
    bounds = np.asarray(table.column("input_ids").combine_chunks().offsets)
    t2 = time.perf_counter()
    return {
        "datasets_map_tokenize_s": round(t1 - t0, 2),
        "datasets_map_read_s": round(t2 - t1, 3),
        "datasets_map_windows": len(bounds) - 1,
        "datasets_map_tokens": len(ids),
    }


def peak_rss_mb(args: list[str]) -> float:
    """Peak RSS of one `train.py` run in a fresh process, in MiB (from the kernel's accounting of that child)."""
    import os

    cmd = [sys.executable, str(ROOT / "scripts" / "train.py"), *args]
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        if status != 0:
            log.seek(0)
            raise RuntimeError(f"train.py failed: {log.read()[-2000:]}")
    return usage.ru_maxrss / 1024


def memory(cache_dir: Path, work: Path) -> dict[str, float]:
    # Batch size 1: the activations of one step depend on the drawn windows' lengths (a 32 x 384 batch of MiniLM
    # holds over 1 GB for the backward pass), which would swamp what the data itself costs.
    common = [
        "--max-steps",
        "1",
        "--max-eval-examples",
        "20",
        "--eval-before-training",
        "false",
        "--save-model",
        "false",
        "--batch-size",
        "1",
        "--eval-batch-size",
        "8",
        "--cache-dir",
        str(cache_dir),
    ]
    result = {}
    for name, extra in (("all", []), ("500", ["--max-train-examples", "500"])):
        for attempt in range(2):  # the first run fills the cache, the second is measured
            rss = peak_rss_mb([*common, *extra, "--output-dir", str(work / f"{name}-{attempt}")])
        result[f"peak_rss_{name}_mb"] = round(rss)
    result["windows_add_mb"] = result["peak_rss_all_mb"] - result["peak_rss_500_mb"]
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-memory", action="store_true", help="only time tokenizing and the cache")
    parser.add_argument("--datasets-map", action="store_true", help="also make the windows with datasets.map")
    args = parser.parse_args(argv)
    setup_logging()
    with tempfile.TemporaryDirectory() as tmp:
        # Memory first, while this process is small: a child's peak RSS counts what it shared with this process
        # before it started train.py.
        result = {} if args.skip_memory else memory(Path(tmp) / "cache", Path(tmp) / "runs")
        result.update(timings(Path(tmp) / "timing-cache"))
        if args.datasets_map:
            result.update(datasets_map(Path(tmp)))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    run(main)
