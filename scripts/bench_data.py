"""Measure the data pipeline on the bundled SQuAD train set: tokenizing, reading cached windows, and memory.

  python scripts/bench_data.py                       # everything below, on all 87,599 train questions
  python scripts/bench_data.py --skip-memory         # only the tokenize and cache timings

Prints one JSON line:
- tokenize_s: windows for the whole train set, one process, no cache;
- cache_write_s / cache_read_s: writing the cache entry, and having the windows back from it (a warm cache);
- peak_rss_all_mb / peak_rss_500_mb: peak resident memory of a one-step `train.py` run on all the train questions
  and on 500 of them (each run once to fill the cache, then measured), and their difference: what the windows of
  the whole train set add to a training process.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _cli import run, setup_logging

ROOT = Path(__file__).resolve().parent.parent


def timings(cache_dir: Path) -> dict[str, float]:
    from bertqa.cache import cached_features
    from bertqa.data import Window, load_examples
    from bertqa.model import build_tokenizer

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
    common = ["--max-steps", "1", "--max-eval-examples", "20", "--eval-before-training", "false", "--save-model",
              "false", "--batch-size", "32", "--cache-dir", str(cache_dir)]  # fmt: skip
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
    args = parser.parse_args(argv)
    setup_logging()
    with tempfile.TemporaryDirectory() as tmp:
        result = timings(Path(tmp) / "cache")
        if not args.skip_memory:
            result.update(memory(Path(tmp) / "cache", Path(tmp) / "runs"))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    run(main)
