"""Answer questions with a trained model.

Examples:
  python scripts/predict.py runs/quick/final_model -q "Who wrote it?" -c "The book was written by Ann Lee in 1990."
  python scripts/predict.py runs/v2/best_model --file questions.jsonl      # {"question": ..., "context": ...} lines
  python scripts/predict.py runs/v2/best_model --file questions.json --out answers.jsonl   # a JSON list works too
  python scripts/predict.py runs/lora/final_model/adapter -q "..." -c "..."   # a LoRA adapter on the base it names

Each output line (strict JSON) has the id (as given, else the question's position), the question, the answer, its
`start`/`end` characters in the context (`context[start:end] == answer`), its `score` (start + end logit) and
`probability` (softmax over the question's candidate spans and "no answer"); with --top-k, that many candidates.
For models trained on SQuAD v2 the answer is "" (start/end null) when the no-answer score is above the threshold
saved with the model (override with --threshold), and `no_answer_probability` is given.

Any transformers question-answering model answers too: a folder saved by plain transformers, or a hub id. Without
bertqa.json it answers with windows that fit it, as a SQuAD 1.1 model (always a span) unless --v2 or --threshold
says it is a SQuAD 2.0 one; the log says which, and says loudly when its QA head was never trained:
  python scripts/predict.py deepset/roberta-base-squad2 --v2 -q "Who wrote it?" -c "It was written by Ann Lee."

What the probabilities mean: `probability` is the model's chance that the answer is exactly right, and
`no_answer_probability` its chance that the question has no answer. `scripts/evaluate.py` measures how well they
hold on data with known answers (its expected calibration error, reliability.png): on a MiniLM fine-tuned for 100
updates, a stated 0.45 came true for 44% of SQuAD dev questions and a stated 0.94 for 90%. A SQuAD v2 run measures
them on its held-out threshold questions and, where they are off by more than 0.05, saves a calibration with the
model that makes them hold there (a temperature for the spans, a scale and shift for "no answer"); they are given
with it, and the answers are the same under any calibration.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bertqa.cli import non_negative_int, positive_int, run, script_parser, setup_logging


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = script_parser(__doc__)
    parser.add_argument("model", help="saved model folder, alias or hub id; or a LoRA run's adapter/ folder")
    parser.add_base_model()
    parser.add_argument("-q", "--question", help="one question (with --context)")
    parser.add_argument("-c", "--context", help="the passage to answer from")
    parser.add_argument("--file", type=Path, help="JSON list or JSONL of {question, context[, id]} objects")
    parser.add_version(threshold_default="the one saved with a v2 model, else 0 with --v2")
    parser.add_argument(
        "--batch-size", type=positive_int, help="windows per forward pass (default: 4 on a CPU, 64 on a GPU)"
    )
    parser.add_argument(
        "--top-k", type=non_negative_int, default=0, help="also list this many candidate answers per question"
    )
    parser.add_precision(help="auto: bf16 where the hardware has it")
    parser.add_argument("--out", type=Path, help="write JSONL here instead of standard output")
    parser.add_flag("--overwrite", help="replace an existing --out file")
    args = parser.parse_args(argv)
    if (args.file is None) == (args.question is None):
        parser.error("give either --question with --context, or --file")
    if args.question is not None and args.context is None:
        parser.error("--question needs --context")
    return args


def read_items(path: Path) -> tuple[list[dict], list[str]]:
    """The questions of a JSONL file or JSON list, each with its place (file and line) for error messages; each
    must have a non-empty question and context (text)."""
    from bertqa.deploy.serving import question_pairs
    from bertqa.loading import read_records

    records = read_records(path)
    items, places = [item for _, item in records], [f"{path}: {place}" for place, _ in records]
    question_pairs(items, places)  # before the model loads
    return items, places


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
    from bertqa.deploy.serving import Answerer
    from bertqa.training.reporting import check_writable, dumps

    if args.out is not None:  # before any work: results that cannot be written are lost
        if args.out.exists() and not args.overwrite:
            raise ValueError(f"{args.out} already exists; pass --overwrite to replace it")
        check_writable(args.out.resolve().parent)
    items, places = (
        read_items(args.file)
        if args.file
        else ([{"question": args.question, "context": args.context}], ["--question/--context"])
    )
    answerer = Answerer(
        args.model,
        batch_size=args.batch_size,
        threshold=args.threshold,
        v2=args.v2,
        precision=args.mixed_precision,
        base_model=args.base_model,
    )
    answers = answerer(items, top_k=args.top_k, places=places)
    lines = [
        dumps({"question": item["question"], **a.to_dict()}, ensure_ascii=False) for item, a in zip(items, answers)
    ]
    text = "\n".join(lines) + "\n"
    if args.out:
        args.out.write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    run(main)
