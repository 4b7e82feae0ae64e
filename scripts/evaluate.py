"""Score a saved model on SQuAD with the official EM/F1; write predictions, n-best lists and scores.

Examples:
  python scripts/evaluate.py runs/quick/final_model --data dev-v1.1
  accelerate launch --num_processes 2 scripts/evaluate.py runs/v2/best_model --data dev-v2.0 --out runs/v2/eval

Writes to --out (main process only): predictions.json (id -> answer, "" for no answer), nbest_predictions.json,
null_odds.json (id -> no-answer score, for the official v2 script's --na-prob-file), scores.json. All are strict
JSON: a score that does not exist (a context with no possible span) is null. The output folder is checked before
any work, and an earlier evaluation is never overwritten unless --overwrite is given.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _cli import output_folder, positive_int, run, setup_logging

RESULTS = ("predictions.json", "nbest_predictions.json", "null_odds.json", "scores.json")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="saved model folder (final_model/best_model of a run), alias or hub id")
    parser.add_argument(
        "--data",
        help="bundled name, data file (.json, .jsonl, .csv, .parquet) or hub dataset id (default: the evaluation "
        "data recorded with the model, read with its column map; dev-v1.1 for a model without bertqa.json)",
    )
    parser.add_argument("--precision", default="auto", choices=("auto", "no", "bf16"), help="auto: bf16 where native")
    parser.add_argument(
        "--column-map", help="your column names, e.g. 'context=passage,question=query,answer_text=gold'"
    )
    parser.add_argument("--answerable-only", action="store_true", help="score only questions that have an answer")
    parser.add_argument("--max-examples", type=positive_int, help="seeded random subset of examples")
    parser.add_argument("--seed", type=int, default=42, help="seed of the subset")
    parser.add_argument("--batch-size", type=positive_int, default=64, help="windows per batch on each process")
    parser.add_argument("--threshold", type=float, help="v2 no-answer threshold (default: the one saved, else 0)")
    parser.add_argument("--out", type=Path, help="output folder (default: <model>/eval, or eval-2, ... if taken)")
    parser.add_argument("--overwrite", action="store_true", help="replace the results in an existing --out folder")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
    from bertqa.inference import evaluate_model
    from bertqa.reporting import dumps

    out = output_folder(args.out, Path(args.model) / "eval", overwrite=args.overwrite, results=RESULTS)
    try:
        metrics, predictions, examples = evaluate_model(
            args.model,
            args.data,
            answerable_only=args.answerable_only,
            max_examples=args.max_examples,
            seed=args.seed,
            batch_size=args.batch_size,
            threshold=args.threshold,
            column_map=args.column_map,
            mixed_precision=args.precision,
        )
    except BaseException:
        with contextlib.suppress(OSError):
            out.rmdir()  # only if still empty: a failed evaluation leaves no empty folder behind
        raise
    if not predictions:  # not the main process
        return 0
    threshold = metrics["no_answer_threshold"]
    order = [ex.id for ex in examples if ex.id in predictions]
    write = lambda name, obj: (out / name).write_text(dumps(obj, indent=1, ensure_ascii=False) + "\n")  # noqa: E731
    write("predictions.json", {q: predictions[q].answer(threshold) for q in order})
    write("nbest_predictions.json", {q: [span._asdict() for span in predictions[q].spans()] for q in order})
    write("null_odds.json", {q: predictions[q].no_answer_score for q in order})
    write("scores.json", metrics)
    shown = {k: round(v, 2) if isinstance(v, float) else v for k, v in metrics.items() if not k.startswith("eval_")}
    print(dumps(shown))
    print(f"wrote predictions.json, nbest_predictions.json, null_odds.json, scores.json to {out}")
    return 0


if __name__ == "__main__":
    run(main)
