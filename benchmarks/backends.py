"""Answer quality and speed of one trained model on each backend: PyTorch fp32, PyTorch bf16 (where native), ONNX
fp32, ONNX int8 and int8-partial, on the same questions, all through `bertqa.deploy.serving.Answerer`.

    python benchmarks/backends.py runs/quick/final_model --questions 1000 --out docs/backends.jsonl

The model is exported to ONNX fp32 and int8 first (`bertqa.deploy.export`, into --work). For each backend: the official
EM/F1 on a seeded sample of the model's evaluation data (its recorded `eval_data`, else the dev set of its
version), the share of questions whose answer is the same as PyTorch fp32's, questions per second answering them
all in batches, and the latency of one question at a time (p50/p95 over --latency-questions). Ratios are against
PyTorch fp32 measured in the same run. Threads: torch's count (OMP_NUM_THREADS), for both runtimes.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from bertqa.cli import positive_int, run, setup_logging


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="trained model folder")
    p.add_argument("--data", help="questions (default: the model's recorded evaluation data, else its dev set)")
    p.add_argument("--questions", type=positive_int, default=1000, help="seeded sample (default: %(default)s)")
    p.add_argument("--latency-questions", type=positive_int, default=200, help="one at a time (default: %(default)s)")
    p.add_argument("--batch-size", type=positive_int, help="windows per batch (default: the Answerer's, 4 on a CPU)")
    p.add_argument("--work", type=Path, default=Path("runs/export-bench"), help="where the exports go")
    p.add_argument("--out", type=Path, help="append one JSON line per backend here")
    return p.parse_args(argv)


def score(examples: list[Any], answers: dict[str, str], v2: bool) -> dict[str, float]:
    from bertqa.metrics import squad_v1_scores, squad_v2_scores

    golds = {ex.id: list(ex.answer_texts) for ex in examples}
    return squad_v2_scores(answers, golds) if v2 else squad_v1_scores(answers, golds)


def measure(answerer: Any, records: list[dict], latency_n: int) -> tuple[dict[str, str], dict[str, float]]:
    """Answers of all records (batched) and the timings: questions/s, single-question p50/p95 in ms."""
    answerer(records[:8])  # warm-up: first-call allocations and kernel choices
    t0 = time.perf_counter()
    answers = answerer(records)
    batched_s = time.perf_counter() - t0
    latencies = []
    for record in records[:latency_n]:
        t = time.perf_counter()
        answerer([record])
        latencies.append(1000 * (time.perf_counter() - t))
    timing = {
        "questions_per_s": len(records) / batched_s,
        "p50_ms": float(np.percentile(latencies, 50)),
        "p95_ms": float(np.percentile(latencies, 95)),
    }
    return {a.id: a.answer for a in answers}, timing


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
    import torch

    from bertqa.deploy.export import export_onnx
    from bertqa.deploy.serving import Answerer, load_settings
    from bertqa.examples import is_v2
    from bertqa.sources import load_examples
    from bertqa.training.runtime import resolve_precision

    settings = load_settings(args.model)
    named = None if settings["eval_rule"] else settings["eval_data"]  # a held-out share is described, not named
    data = args.data or named or ("dev-v2.0" if settings["v2"] else "dev-v1.1")
    examples, _ = load_examples(data, max_examples=args.questions, seed=0, column_map=settings["column_map"])
    records = [{"id": ex.id, "question": ex.question, "context": ex.context} for ex in examples]
    v2 = is_v2(examples) or bool(settings["v2"])
    backends: list[tuple[str, str | Path, str]] = [("torch-fp32", args.model, "no")]
    if resolve_precision("auto") == "bf16":
        backends.append(("torch-bf16", args.model, "bf16"))
    for quantize in (None, "int8", "int8-partial"):
        folder = args.work / f"{Path(args.model).parent.name}-onnx-{quantize or 'fp32'}"
        report = export_onnx(args.model, folder, quantize=quantize, overwrite=True)
        print(report.format(), flush=True)
        backends.append((f"onnx-{quantize or 'fp32'}", folder, "auto"))
    print(f"{len(examples)} questions of {data}, {torch.get_num_threads()} threads", flush=True)
    rows, reference = [], None
    for name, folder, precision in backends:
        answerer = Answerer(folder, precision=precision, batch_size=args.batch_size)
        answers, timing = measure(answerer, records, args.latency_questions)
        reference = reference or answers
        same = sum(answers[q] == reference[q] for q in reference) / len(reference)
        scores = score(examples, answers, v2)
        row = {
            "model": args.model,
            "backend": name,
            "data": data,
            "questions": len(examples),
            **timing,
            "same_as_torch_fp32": same,
            **{k: v for k, v in scores.items() if k != "total"},
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.out:
            with args.out.open("a") as f:
                f.write(json.dumps(row) + "\n")
    base = rows[0]
    print("\n| backend | EM | F1 | same answer as torch fp32 | questions/s | x torch fp32 | p50 ms | p95 ms |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['backend']} | {r['exact']:.2f} | {r['f1']:.2f} | {100 * r['same_as_torch_fp32']:.1f}% | "
            f"{r['questions_per_s']:.1f} | {r['questions_per_s'] / base['questions_per_s']:.2f} | "
            f"{r['p50_ms']:.0f} | {r['p95_ms']:.0f} |"
        )
    return 0


if __name__ == "__main__":
    run(main)
