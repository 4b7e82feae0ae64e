"""Window a SQuAD set, label it, and run the label self-check: how many labels decode back to their gold answer.

Examples:
  python scripts/check_labels.py --data train-v1.1                  # the whole bundled train set
  python scripts/check_labels.py --data dev-v2.0 --max-seq-length 256 --doc-stride 64
  python scripts/check_labels.py --data train-v1.1 --workers 8          # tokenize in 8 processes

Prints the report and the time of each stage (load, tokenize, label, check).
"""

from __future__ import annotations

import logging
import time

from bertqa import data
from bertqa.cli import positive_int, run, script_parser, setup_logging, share
from bertqa.sources import load_examples

logger = logging.getLogger("bertqa")


def main(argv: list[str] | None = None) -> int:
    parser = script_parser(__doc__)
    parser.add_data_flags(
        default="train-v1.1",
        data_help="bundled name, data file (.json, .jsonl, .csv, .parquet) or hub dataset id, optionally with [a:b] "
        "articles",
    )
    parser.add_argument("--model", default="minilm-l6", help="whose tokenizer to use")
    for name in ("max_seq_length", "doc_stride", "max_query_length"):
        default = getattr(data.Window, name)
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=default, help="window setting")
    parser.add_argument(
        "--workers", type=positive_int, default=1, help="tokenizing processes (same windows for any number)"
    )
    parser.add_argument("--min-match-rate", type=share, default=0.99, help="fail (exit 2) below this match rate")
    args = parser.parse_args(argv)
    setup_logging()
    from bertqa.model import build_tokenizer

    tokenizer = build_tokenizer(args.model)
    t0 = time.perf_counter()
    examples, report = load_examples(
        args.data,
        answerable=args.answerable_only,
        max_examples=args.max_examples,
        seed=args.seed,
        column_map=args.column_map,
        skip_bad_records=args.skip_bad_records,
    )
    for line in report.warnings:
        logger.warning("%s", line)
    t1 = time.perf_counter()
    window = data.Window(args.max_seq_length, args.doc_stride, args.max_query_length)
    features = data.tokenize_examples(examples, tokenizer, window, num_proc=args.workers)
    t2 = time.perf_counter()
    data.label_features(features, examples)
    t3 = time.perf_counter()
    labels = data.check_labels(features, examples, min_match_rate=args.min_match_rate)
    t4 = time.perf_counter()
    print(report.format())
    print(labels.format())
    print(
        f"time: load {t1 - t0:.1f} s, tokenize {t2 - t1:.1f} s ({len(examples) / (t2 - t1):,.0f} examples/s), "
        f"label {t3 - t2:.1f} s, check {t4 - t3:.1f} s"
    )
    return 0


if __name__ == "__main__":
    run(main)
