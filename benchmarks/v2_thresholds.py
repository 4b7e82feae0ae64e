"""A trained SQuAD v2 model scored on its evaluation data at no-answer thresholds chosen in different ways.

    python benchmarks/v2_thresholds.py runs/v2-offline

Reads the run's `config.json`, rebuilds its examples (`bertqa.sources.run_examples`, so the same held-out
threshold questions and the same evaluation data) and predicts once on each side with `final_model` (or
`--model`). Then each way of choosing the threshold is applied to the evaluation data: on all held-out training
questions (what training does), on the held-out questions without the added negatives (real questions only),
at 0, and the evaluation data's own best (optimistic, an upper bound). "No answer" to everything is the baseline.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bertqa.config import load_config
from bertqa.deploy.serving import answer_questions
from bertqa.metrics import squad_v2_scores
from bertqa.model import build_model, build_tokenizer
from bertqa.sources import run_examples
from bertqa.training.runtime import resolve_precision


def predictions(model, tokenizer, examples, config):
    """(span texts, no-answer scores, gold answers) by question id, from the same path `Answerer` takes."""
    import torch

    settings = {**config.window.to_dict(), "max_answer_length": config.max_answer_length}
    pairs = [(ex.question, ex.context) for ex in examples]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=resolve_precision("auto") == "bf16"):
        preds = answer_questions(model, tokenizer, pairs, settings=settings, batch_size=config.eval_batch_size)
    golds = {ex.id: list(ex.answer_texts) for ex in examples}
    by_id = dict(zip(golds, preds))
    return {q: p.text for q, p in by_id.items()}, {q: p.no_answer_score for q, p in by_id.items()}, golds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a run folder of a SQuAD v2 run (config.json, final_model)")
    parser.add_argument("--model", type=Path, help="the model to score (default: RUN/final_model)")
    args = parser.parse_args()
    config = load_config(args.run / "config.json")
    model_dir = args.model or args.run / "final_model"
    examples = run_examples(**config.example_settings())
    if not examples.calibration:
        parser.error(f"{args.run} held out no training questions to choose a threshold on (not a v2 training run)")
    ids = {ex.id for ex in examples.calibration}
    # An added negative is "<question id>-neg<k>" beside its question (`bertqa.negatives`).
    real = {ex.id for ex in examples.calibration if not (ex.is_impossible and ex.id.rsplit("-neg", 1)[0] in ids)}
    tokenizer, model = build_tokenizer(model_dir), build_model(model_dir).eval()
    cal_text, cal_na, cal_golds = predictions(model, tokenizer, examples.calibration, config)
    text, na, golds = predictions(model, tokenizer, examples.eval, config)

    def chosen_on(ids: set[str]) -> float:
        keep = {q: g for q, g in cal_golds.items() if q in ids}
        return squad_v2_scores(cal_text, keep, cal_na)["best_f1_thresh"]

    own_best = squad_v2_scores(text, golds, na)["best_f1_thresh"]
    ways = {
        f"held-out training questions, negatives included ({len(cal_golds):,})": chosen_on(set(cal_golds)),
        f"held-out training questions without the negatives ({len(real & set(cal_golds)):,})": chosen_on(real),
        "0 (no calibration)": 0.0,
        "the evaluation data's own best (optimistic)": own_best,
    }
    rows = []
    for way, threshold in ways.items():
        s = squad_v2_scores(text, golds, na, threshold=threshold)
        rows.append(
            {
                "threshold chosen on": way,
                "threshold": round(threshold, 3),
                "F1": round(s["f1"], 2),
                "HasAns F1": round(s["HasAns_f1"], 2),
                "NoAns F1": round(s.get("NoAns_f1", 0.0), 2),
            }
        )
    no_answer = squad_v2_scores(dict.fromkeys(golds, ""), golds)["f1"]
    print("| threshold chosen on | threshold | F1 | HasAns F1 | NoAns F1 |\n|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(str(v) for v in row.values()) + " |")
    print(f'| "no answer" to everything | | {no_answer:.2f} | 0.00 | 100.00 |')
    (args.run / "v2_thresholds.json").write_text(json.dumps({"rows": rows, "all_null_f1": no_answer}, indent=1))


if __name__ == "__main__":
    main()
