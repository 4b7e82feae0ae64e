"""Score a saved model on SQuAD with the official EM/F1; write predictions, n-best lists and scores.

Examples:
  python scripts/evaluate.py runs/quick/final_model --data dev-v1.1
  accelerate launch --num_processes 2 scripts/evaluate.py runs/v2/best_model --data dev-v2.0 --out runs/v2/eval
  python scripts/evaluate.py deepset/roberta-base-squad2 --v2 --data dev-v2.0   # any transformers QA model

A model without bertqa.json (saved by plain transformers, or a hub id) is scored with windows that fit it, as a SQuAD
1.1 model unless --v2 or --threshold says it is a SQuAD 2.0 one; the log says which.

Without --data it scores the questions the model was evaluated on in training: the evaluation data recorded with
it, or the share its run held out of the training data (drawn again by the recorded rule).

Writes to --out (main process only): predictions.json (id -> answer, "" for no answer), nbest_predictions.json,
null_odds.json (id -> no-answer score, for the official v2 script's --na-prob-file), questions.jsonl (one line per
question, worst first: question, gold answers, prediction, its probability, EM, F1, what kind of error, and for v2
the no-answer score and probability), scores.json (the metrics, and how many questions of each kind of error). All
are strict JSON: a score that does not exist (a context with no possible span) is null. The output folder (default
eval/MODEL/DATA in the working folder, said at the start) is checked before any work, and an earlier evaluation is
never overwritten unless --overwrite is given.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import re
from pathlib import Path
from typing import Any

from bertqa.cli import output_folder, positive_int, run, script_parser, setup_logging

logger = logging.getLogger("bertqa")

RESULTS = (
    "predictions.json",
    "nbest_predictions.json",
    "null_odds.json",
    "questions.jsonl",
    "scores.json",
    "reliability.png",
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = script_parser(__doc__)
    parser.add_argument(
        "model",
        help="saved model folder (final_model/best_model of a run, or one scripts/export.py wrote), alias or hub id",
    )
    parser.add_data_flags(
        default=None,
        data_help="bundled name, data file (.json, .jsonl, .csv, .parquet) or hub dataset id (default: the "
        "evaluation data recorded with the model, read as in training; dev-v1.1 for a model without bertqa.json)",
        recorded="as the model's run read the recorded evaluation data",
    )
    parser.add_precision(help="auto: bf16 where native")
    parser.add_base_model()
    parser.add_argument("--batch-size", type=positive_int, default=64, help="windows per batch on each process")
    parser.add_version(threshold_default="the one saved, else 0")
    parser.add_argument(
        "--out",
        type=Path,
        help="output folder (default: eval/MODEL/DATA in the working folder, e.g. eval/quick-final_model/dev-v1.1, "
        "or DATA-2, ... if taken; never inside the model folder, which travels with every copy of the model)",
    )
    parser.add_flag("--overwrite", help="replace the results in an existing --out folder")
    return parser.parse_args(argv)


def recorded_eval_data(model_dir: str | Path, settings: dict[str, Any]) -> str | None:
    """The evaluation data saved with a model (`bertqa.json`), to score it on the same questions again; None when
    the run held its evaluation questions out of its training data by a rule recorded there (`eval_rule`)."""
    if not (Path(model_dir) / "bertqa.json").is_file():
        data = plain_model_data(v2=bool(settings["v2"]))
        logger.info("%s has no bertqa.json: evaluating on %s (pass --data for other data)", model_dir, data)
        return data
    if settings.get("eval_rule"):  # a held-out share (its eval_data says which, in words)
        return None
    if settings.get("eval_data"):
        logger.info("evaluating on %s, the evaluation data recorded with the model", settings["eval_data"])
        return str(settings["eval_data"])
    raise ValueError(
        f"{model_dir} records no evaluation data to use again (it was evaluated on examples passed to fit); pass --data"
    )


def plain_model_data(*, v2: bool) -> str:
    """What a model without `bertqa.json` is scored on unless --data says: the SQuAD dev set of the version it
    answers as (SQuAD 2.0 with --v2 or --threshold)."""
    return "dev-v2.0" if v2 else "dev-v1.1"


def load_eval_examples(
    eval_data: str | None,
    settings: dict[str, Any],
    *,
    answerable_only: bool,
    max_examples: int | None,
    seed: int,
    column_map: str | None,
    skip_bad_records: bool | None = None,
) -> list[Any]:
    """The questions to score: `eval_data`, or (None) the ones the run held out, drawn again by its recorded rule.
    The recorded evaluation data is read as in training (its column map, bad records skipped if they were), each
    unless given (`column_map`, `skip_bad_records` not None)."""
    from bertqa import sources

    if eval_data is None:
        return _held_out_again(
            settings,
            answerable_only=answerable_only,
            max_examples=max_examples,
            seed=seed,
            given=(column_map, skip_bad_records),
        )
    if settings.get("eval_data") is not None and sources.findable(eval_data) == settings["eval_data"]:
        if column_map is None:  # an older model records one map for both
            recorded = settings.get("eval_column_map")
            column_map = recorded if recorded is not None else settings.get("column_map")
        if skip_bad_records is None:
            skip_bad_records = bool(settings.get("skip_bad_records"))
    examples, report = sources.load_examples(
        eval_data,
        answerable=answerable_only,
        max_examples=max_examples,
        seed=seed,
        column_map=column_map,
        skip_bad_records=bool(skip_bad_records),
    )
    logger.info("loaded %s", report.format())
    for line in report.warnings:
        logger.warning("%s", line)
    return examples


def _held_out_again(
    settings: dict[str, Any], *, answerable_only: bool, max_examples: int | None, seed: int, given: tuple[Any, Any]
) -> list[Any]:
    """The questions the run held out of its training data, drawn again by its recorded rule (which reads the
    training data as the run did: a column map or skip setting `given` here is not used, and said so)."""
    from bertqa import sources

    if any(value is not None for value in given):
        logger.warning(
            "--column-map and --skip-bad-records are not used: the held-out questions are drawn again from the "
            "training data, read as the run read it (pass --data to read other data your way)"
        )
    rule = settings["eval_rule"]
    examples = sources.run_examples(**rule).eval
    share = rule.get("eval_split") or sources.DEFAULT_EVAL_SPLIT
    logger.info(
        "evaluating on the %d questions the run held out of %s (%.0f%%, seed %s), drawn again by the rule recorded "
        "with the model",
        len(examples),
        rule["train_data"],
        100 * share,
        rule["seed"],
    )
    examples = sources.answerable_only(examples) if answerable_only else examples
    return sources.subsample(examples, max_examples, seed=seed)


def evaluate_model(
    model_dir: str,
    eval_data: str | None = None,
    *,
    answerable_only: bool = False,
    max_examples: int | None = None,
    seed: int = 42,
    batch_size: int = 64,
    threshold: float | None = None,
    v2: bool | None = None,
    mixed_precision: str = "auto",
    column_map: str | None = None,
    skip_bad_records: bool | None = None,
    base_model: str | None = None,
) -> tuple[dict[str, float], dict[str, Any], list[Any]]:
    """Score a saved model on a dataset with the settings it was trained with; works under `accelerate launch`.

    `eval_data` defaults to the evaluation data recorded with the model (dev-v1.1 for a model without
    `bertqa.json`). For v2 data the no-answer threshold is `threshold`, else the one saved with the model, else 0.
    A model without `bertqa.json` (any transformers QA model) is scored with windows that fit it, as SQuAD 1.1 unless
    `v2` or a `threshold` makes it a SQuAD 2.0 model (`bertqa.deploy.settings`); a threshold is never ignored.
    A model trained for the other SQuAD version than the data's is scored all the same, with a loud warning. A LoRA
    adapter folder is put on its base (`base_model`, else the one it names).
    Returns (metrics, predictions, examples); metrics on every process, predictions on the main one.
    """
    from bertqa.data import Window, tokenize_examples
    from bertqa.deploy.backends import is_exported, load_qa_model, precision_for
    from bertqa.deploy.settings import answer_settings
    from bertqa.inference import eval_batches, evaluate
    from bertqa.model import build_tokenizer
    from bertqa.postprocess import Calibration
    from bertqa.training.runtime import make_accelerator, resolve_precision

    tokenizer = build_tokenizer(model_dir)
    settings, saved = answer_settings(model_dir, tokenizer, v2=v2, threshold=threshold)
    eval_data = eval_data or recorded_eval_data(model_dir, settings)
    accelerator = make_accelerator(mixed_precision=resolve_precision(precision_for(model_dir, mixed_precision)))
    subset = {"answerable_only": answerable_only, "max_examples": max_examples, "seed": seed}
    reading = {"column_map": column_map, "skip_bad_records": skip_bad_records}
    examples = load_eval_examples(eval_data, settings, **reading, **subset)
    eval_data = eval_data or "the held-out share"
    features = tokenize_examples(examples, tokenizer, Window.from_dict(settings))
    # An exported model runs on ONNX Runtime in each process as it is: nothing of it for Accelerate to wrap.
    # A model that only predicts needs no DistributedDataParallel wrapper, which would also have to be let go of
    # before the process group is shut down.
    model = load_qa_model(model_dir, base_model=base_model)
    model = model if is_exported(model_dir) else accelerator.prepare_model(model, evaluation_mode=True)
    asked = v2 is not None or threshold is not None  # said by answer_settings; nothing to compare with training
    scored_v2 = _scored_version(model_dir, settings, examples, eval_data, compare=not asked, saved=saved)
    logger.info(
        "evaluating %d examples (%d windows, %s) on %d processes",
        *(len(examples), len(features), "v2.0" if scored_v2 else "v1.1", accelerator.num_processes),
    )
    if threshold is None and scored_v2 and settings["no_answer_threshold"] is not None:
        _warn_if_tuned_on_eval_data(model_dir, settings, eval_data)
    threshold = settings["no_answer_threshold"] or 0.0  # as asked, else as saved (answer_settings)
    loader = eval_batches(features, batch_size=batch_size, pad_token_id=tokenizer.pad_token_id, accelerator=accelerator)
    metrics, predictions = evaluate(
        accelerator,
        model,
        loader,
        examples,
        v2=scored_v2,
        max_answer_length=settings["max_answer_length"],
        threshold=threshold,
        progress=True,
    )
    metrics["no_answer_threshold"] = threshold if scored_v2 else None
    metrics["calibration"] = Calibration.from_settings(settings).to_settings()  # how probabilities are given
    return metrics, predictions, examples


def _scored_version(
    model_dir: str, settings: dict[str, Any], examples: list[Any], eval_data: str, *, compare: bool, saved: bool
) -> bool:
    """Whether to score as SQuAD 2.0. As in training: a model answering as v2 is scored as v2 on any data (its "no
    answer" counts), v2 data with any model. With `compare` (no version asked for), a model trained for the other
    version than the data's is said loudly, and so is v2 data given to a model that does not say (`saved`: it has
    a bertqa.json) what it was trained for."""
    from bertqa.examples import is_v2

    data_v2, model_v2 = is_v2(examples), bool(settings["v2"])
    if compare and not saved and data_v2:  # nothing says what it was trained for: the likely fix, said
        logger.warning(
            "%s has unanswerable questions, and %s answers as a SQuAD 1.1 model (it has no bertqa.json): each of "
            "them counts as wrong unless it may say 'no answer'; pass --v2 (or --threshold) if it is a SQuAD 2.0 model",
            eval_data,
            model_dir,
        )
    elif compare and saved and data_v2 != model_v2:
        logger.warning(
            "VERSION MISMATCH: %s was trained on SQuAD %s data but %s is SQuAD %s: %s",
            *(model_dir, "v2.0" if model_v2 else "v1.1", eval_data, "v2.0" if data_v2 else "v1.1"),
            "its unanswerable questions count against a model that never learned to say 'no answer'"
            if data_v2
            else "it is scored as v2.0 with the model's no-answer threshold, as in training, so each "
            "'no answer' counts as wrong here (every question has an answer)",
        )
    return data_v2 or model_v2


def _warn_if_tuned_on_eval_data(model_dir: str, settings: dict[str, Any], eval_data: str) -> None:
    """Say so when the saved threshold was chosen on the model's evaluation data (its training data had no
    unanswerable question to choose it on): scores on that data at that threshold are tuned on it."""
    chosen_on = settings.get("threshold_calibrated_on") or {}
    if not str(chosen_on.get("source", "")).startswith("the evaluation data"):
        return
    same = eval_data == settings.get("eval_data")
    logger.warning(
        "the no-answer threshold saved with %s (%s) was chosen on its evaluation data %s, not on held-out training "
        "questions (its training data had no unanswerable question)%s; pass --threshold, or train with "
        "unanswerable questions or --negatives for a calibrated one",
        *(model_dir, settings["no_answer_threshold"], settings.get("eval_data") or "(a held-out share)"),
        ": these scores are tuned on the data they score (optimistic)" if same else "",
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
    from bertqa.model import check_model_folder
    from bertqa.postprocess import STATED, Calibration, confidence, error_summary, question_report
    from bertqa.training.reporting import dumps, plot_reliability

    check_model_folder(args.model)  # before any folder is made: a mistyped path must not become one
    from bertqa.deploy.settings import answers_v2

    default = default_out(args.model, args.data or None, v2=answers_v2(False, v2=args.v2, threshold=args.threshold))
    out = output_folder(args.out, default, overwrite=args.overwrite, results=RESULTS)
    logger.info("results go to %s%s", out, " (--out to choose another folder)" if args.out is None else "")
    try:
        metrics, predictions, examples = evaluate_model(
            args.model,
            args.data,
            answerable_only=args.answerable_only,
            max_examples=args.max_examples,
            seed=args.seed,
            batch_size=args.batch_size,
            threshold=args.threshold,
            v2=args.v2,
            column_map=args.column_map,
            skip_bad_records=args.skip_bad_records,
            mixed_precision=args.mixed_precision,
            base_model=args.base_model,
        )
    except BaseException:
        # Only folders left empty: a failed evaluation leaves none behind (eval/MODEL/DATA: three of them)
        for folder in (out, *([out.parent, out.parent.parent] if args.out is None else [])):
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    if not predictions:  # not the main process
        return 0
    threshold = metrics["no_answer_threshold"]
    order = [ex.id for ex in examples if ex.id in predictions]
    write = lambda name, obj: (out / name).write_text(dumps(obj, indent=1, ensure_ascii=False) + "\n")  # noqa: E731
    write("predictions.json", {q: predictions[q].answer(threshold) for q in order})
    write("nbest_predictions.json", {q: [span._asdict() for span in predictions[q].spans()] for q in order})
    write("null_odds.json", {q: predictions[q].no_answer_score for q in order})
    v2, calibration = threshold is not None, Calibration(**metrics["calibration"])
    rows = question_report(examples, predictions, v2=v2, threshold=threshold, calibration=calibration)
    (out / "questions.jsonl").write_text("".join(dumps(row, ensure_ascii=False) + "\n" for row in rows))
    metrics["errors"], metrics["confidence"] = error_summary(rows), confidence(rows)
    write("scores.json", metrics)
    logger.info("%s", describe_errors(metrics["errors"], len(rows)))
    logger.info("%s", describe_confidence(metrics["confidence"]))
    plot_reliability(
        {f"{name}: {STATED[name]}": c["bins"] for name, c in metrics["confidence"].items()}, out / "reliability.png"
    )
    shown = {k: round(v, 2) if isinstance(v, float) else v for k, v in metrics.items() if not k.startswith("eval_")}
    shown["confidence"] = {f"{name}_ece": round(c["ece"], 3) for name, c in metrics["confidence"].items()}
    print(dumps(shown))
    print(f"wrote {', '.join(RESULTS)} to {out}")
    return 0


def default_out(model: str, data: str | None, *, v2: bool = False) -> Path:
    """Where results go unless --out says: eval/MODEL/DATA in the working folder (beside the model folder when the
    working folder is inside it: results never go into the model, which travels with every copy and push). MODEL is
    a folder's name with its parent's (runs/quick/final_model: quick-final_model) or a hub id with "--" for "/";
    DATA the data's name (its file name without endings, a hub id as above, an article range kept:
    dev-v2.0_articles_3-5), or the recorded evaluation data's ("held-out" for a held-out share)."""
    from bertqa.deploy.serving import load_settings
    from bertqa.sources import split_article_range

    path, root = Path(model).expanduser(), Path("eval")
    if path.is_dir():
        resolved = path.resolve()
        model_label = "-".join(p for p in (resolved.parent.name, resolved.name) if p)
        if Path.cwd().resolve().is_relative_to(resolved):
            root = resolved.parent / "eval"
    else:
        model_label = model.replace("/", "--")
    if data is None and path.is_dir() and (path / "bertqa.json").is_file():
        settings = load_settings(path)
        data = "held-out" if settings.get("eval_rule") else settings.get("eval_data")
    name, articles = split_article_range(data or plain_model_data(v2=v2))
    stem = Path(name).name if Path(name).exists() else str(name).replace("/", "--")
    stem = re.sub(r"(\.(json|jsonl|csv|parquet))?(\.gz)?$", "", stem)
    if articles is not None:
        stem += f"_articles_{articles.start or 0}-{'' if articles.stop is None else articles.stop}"
    return root / _folder_name(model_label) / _folder_name(stem)


def _folder_name(text: str) -> str:
    return re.sub(r"[^\w.-]+", "_", text).strip("_") or "data"


def describe_errors(counts: dict[str, int], total: int) -> str:
    """The error summary as lines a person reads: how many questions of each kind, the largest first."""
    from bertqa.postprocess import ERROR_KINDS

    lines = [f"{n:>7,} {100 * n / max(total, 1):5.1f}%  {ERROR_KINDS[kind]}" for kind, n in counts.items() if n]
    return "what the answers were (questions.jsonl lists each, worst first):\n" + "\n".join(sorted(lines, reverse=True))


def describe_confidence(confidence: dict[str, dict[str, Any]]) -> str:
    """Each probability's expected calibration error and bins, as lines a person reads."""
    from bertqa.postprocess import STATED

    lines = []
    for name, c in confidence.items():
        lines.append(
            f"{name} (the chance that {STATED[name]}): expected calibration error {c['ece']:.3f} over "
            f"{c['questions']:,} questions (0: it means what it says)"
        )
        lines += [
            f"  {row['low']:.1f}-{row['high']:.1f}: {row['count']:>6,} questions, stated {row['confidence']:.2f}, "
            f"right {row['accuracy']:.2f}"
            for row in c["bins"]
            if row["count"]
        ]
    return "\n".join(lines)


if __name__ == "__main__":
    run(main)
