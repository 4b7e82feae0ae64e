"""Answer questions with a trained model.

Examples:
  python scripts/predict.py runs/quick/final_model -q "Who wrote it?" -c "The book was written by Ann Lee in 1990."
  python scripts/predict.py runs/v2/best_model --file questions.jsonl      # {"question": ..., "context": ...} lines
  python scripts/predict.py runs/v2/best_model --file questions.json --out answers.jsonl   # a JSON list works too

For models trained on SQuAD v2 the answer is "" when the no-answer score is above the threshold saved with the
model (override with --threshold). Each output line has the answer, its span score and the no-answer score.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _cli import positive_int, run, setup_logging


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="saved model folder, alias or hub id")
    parser.add_argument("-q", "--question", help="one question (with --context)")
    parser.add_argument("-c", "--context", help="the passage to answer from")
    parser.add_argument("--file", type=Path, help="JSON list or JSONL of {question, context[, id]} objects")
    parser.add_argument("--threshold", type=float, help="no-answer threshold (default: the one saved with the model)")
    parser.add_argument("--batch-size", type=positive_int, default=64, help="windows per batch")
    parser.add_argument("--out", type=Path, help="write JSONL here instead of standard output")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    args = parser.parse_args(argv)
    if (args.file is None) == (args.question is None):
        parser.error("give either --question with --context, or --file")
    if args.question is not None and args.context is None:
        parser.error("--question needs --context")
    return args


def read_items(path: Path) -> list[dict]:
    """The questions of a JSONL file or JSON list; each must have a non-empty question and context (text)."""
    from bertqa.loading import read_records

    items = []
    for place, item in read_records(path):
        for key in ("question", "context"):
            if not isinstance(item.get(key), str) or not item[key].strip():
                problem = "is missing" if key not in item else "must be non-empty text"
                raise ValueError(f"{path}: {place}: {key!r} {problem}")
        items.append(item)
    return items


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
    import torch

    from bertqa.inference import answer_questions, load_settings
    from bertqa.model import build_model, build_tokenizer
    from bertqa.reporting import check_writable, dumps

    if args.out is not None:  # before any work: results that cannot be written are lost
        if args.out.exists() and not args.overwrite:
            raise ValueError(f"{args.out} already exists; pass --overwrite to replace it")
        check_writable(args.out.resolve().parent)
    items = read_items(args.file) if args.file else [{"question": args.question, "context": args.context}]
    settings = load_settings(args.model)
    threshold = args.threshold if args.threshold is not None else settings["no_answer_threshold"]
    model = build_model(args.model).to("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = build_tokenizer(args.model)
    preds = answer_questions(
        model,
        tokenizer,
        [(it["question"], it["context"]) for it in items],
        settings=settings,
        batch_size=args.batch_size,
    )
    lines = []
    for i, (item, pred) in enumerate(zip(items, preds)):
        record = {
            "id": item.get("id", i),
            "question": item["question"],
            "answer": pred.answer(threshold),
            "score": round(pred.span_score, 4),
            "no_answer_score": round(pred.no_answer_score, 4),
        }
        lines.append(dumps(record, ensure_ascii=False))
    text = "\n".join(lines) + "\n"
    if args.out:
        args.out.write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    run(main)
