"""Inference speed of trained QA models on the same evaluation windows: a smaller student against its teacher.

    python benchmarks/student_speed.py runs/quick/best_model runs/student/final_model --max-eval-examples 1000

Each model predicts the start/end logits of every window (the evaluation loop, `bertqa.inference.predict_logits`,
same batch size and precision for all). The models take turns, `--repeats` rounds, so a slow phase of a shared
machine hits each alike; the best round of each is reported, with the speedup of every model over the first.
"""

from __future__ import annotations

import argparse
import json
import time

from bertqa.cli import positive_int, run, setup_logging


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="+", help="trained model folders (or aliases); the first is the reference")
    p.add_argument("--eval-data", default="dev-v1.1", help="the questions whose windows are timed")
    p.add_argument("--max-eval-examples", type=positive_int, default=1000, help="seeded subset of the questions")
    p.add_argument("--batch-size", type=positive_int, default=64, help="windows per batch")
    p.add_argument(
        "--precision",
        "--mixed-precision",
        default="auto",
        choices=("auto", "no", "bf16"),
        help="auto: bf16 where native",
    )
    p.add_argument("--repeats", type=positive_int, default=3, help="rounds; each model's best round counts")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
    from bertqa.data import Window, tokenize_examples
    from bertqa.deploy.serving import load_settings
    from bertqa.inference import eval_batches, predict_logits
    from bertqa.model import build_model, build_tokenizer
    from bertqa.sources import load_examples
    from bertqa.training.runtime import make_accelerator, resolve_precision

    accelerator = make_accelerator(mixed_precision=resolve_precision(args.precision))
    tokenizer = build_tokenizer(args.models[0])
    examples, _ = load_examples(args.eval_data, max_examples=args.max_eval_examples, seed=42)
    features = tokenize_examples(examples, tokenizer, Window.from_dict(load_settings(args.models[0])))
    loader = eval_batches(features, batch_size=args.batch_size, pad_token_id=tokenizer.pad_token_id)
    models = [accelerator.prepare(build_model(path)).eval() for path in args.models]
    best = [float("inf")] * len(models)
    for _ in range(args.repeats):
        for i, model in enumerate(models):
            start = time.perf_counter()
            predict_logits(model, loader, accelerator=accelerator)
            best[i] = min(best[i], time.perf_counter() - start)
    for path, model, seconds in zip(args.models, models, best):
        print(
            json.dumps(
                {
                    "model": str(path),
                    "layers": model.config.num_hidden_layers,
                    "parameters": sum(p.numel() for p in model.parameters()),
                    "windows": len(features),
                    "seconds": round(seconds, 2),
                    "windows_per_s": round(len(features) / seconds, 1),
                    "speedup_over_first": round(best[0] / seconds, 2),
                    "precision": accelerator.mixed_precision,
                }
            )
        )
    return 0


if __name__ == "__main__":
    run(main)
