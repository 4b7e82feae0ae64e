"""Train the same model on the same data with a transformers.Trainer set up as run_qa.py sets it up.

The side-by-side partner of scripts/train.py: it reads the same preset, config and flags, trains on the same
examples and windows with the same hyperparameters (lr, epochs, batch, warmup ratio, weight decay, clipping, seed,
precision), and scores the same evaluation examples with bertqa's post-processing and the official metrics, so the
only differences are the loops: windows padded to max_seq_length, the Trainer's data pipeline and its loss.

  python benchmarks/trainer_baseline.py --preset quick --time-budget none --max-train-examples 10000 --epochs 1 \
      --output-dir runs/quick-trainer
  python scripts/train.py --preset quick --time-budget none --max-train-examples 10000 --epochs 1 \
      --output-dir runs/quick-cmp     # bertqa, for the comparison

The Trainer has no time budget: give the run a fixed length (`--time-budget none`, as above, or `--max-steps`).

Prints one JSON line: EM/F1 (HasAns/NoAns for v2), train_time_s, eval_time_s, wall_time_s.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from _trainer import padded_dataset, training_arguments

from bertqa.cli import config_from_args, config_parser, run, setup_logging
from bertqa.config import TrainConfig


def train_and_score(c: TrainConfig) -> dict[str, Any]:
    """The Trainer run for config `c`: train, predict the eval windows, post-process and score."""
    import transformers
    from transformers import Trainer, default_data_collator

    from bertqa.cache import prepare_data
    from bertqa.examples import is_v2
    from bertqa.model import build_model, build_tokenizer
    from bertqa.postprocess import postprocess, score
    from bertqa.sources import run_examples
    from bertqa.training.optim import count_updates
    from bertqa.training.runtime import resolve_precision

    t_start = time.perf_counter()
    tokenizer = build_tokenizer(c.model)
    examples = run_examples(**c.example_settings())  # what `fit` trains and evaluates on, in the same way
    data = prepare_data(examples, tokenizer, window=c.window, cache_dir=c.cache_dir, num_proc=c.tokenize_workers)
    eval_examples, train_features, eval_features = examples.eval, data.train_features, data.eval_features
    pad = {"width": c.max_seq_length, "pad_token_id": tokenizer.pad_token_id}
    train_set = padded_dataset(train_features, labelled=True, **pad)
    eval_set = padded_dataset(eval_features, labelled=False, **pad)

    transformers.set_seed(c.seed)  # the QA head's initialisation, as in run_qa.py
    model = build_model(c.model, attn_implementation=c.attn_implementation, attention_dropout=c.attention_dropout)
    batches = math.ceil(len(train_set) / c.batch_size)
    _, total_steps = count_updates(batches, grad_accum=c.grad_accum, epochs=c.epochs, max_steps=c.max_steps)
    args = training_arguments(
        c.output_dir,
        precision=resolve_precision(c.mixed_precision),
        seed=c.seed,
        per_device_train_batch_size=c.batch_size,
        per_device_eval_batch_size=c.eval_batch_size,
        gradient_accumulation_steps=c.grad_accum,
        learning_rate=c.lr,
        lr_scheduler_type=c.schedule,
        max_steps=total_steps,
        warmup_steps=round(c.warmup_ratio * total_steps),
        weight_decay=c.weight_decay,
        adam_epsilon=c.adam_eps,
        max_grad_norm=c.max_grad_norm,
        logging_steps=c.log_every,
        dataloader_num_workers=c.num_workers,
    )
    trainer = Trainer(model=model, args=args, train_dataset=train_set, data_collator=default_data_collator)
    t0 = time.perf_counter()
    trainer.train()
    t1 = time.perf_counter()
    start, end = trainer.predict(eval_set).predictions[:2]
    predictions = postprocess(eval_examples, eval_features, start, end, max_answer_length=c.max_answer_length)
    metrics = score(eval_examples, predictions, v2=is_v2(eval_examples))
    t2 = time.perf_counter()
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    return {
        "loop": "transformers.Trainer (run_qa.py setup)",
        **{k: round(v, 2) for k, v in metrics.items() if k in ("exact", "f1", "HasAns_f1", "NoAns_f1", "best_f1")},
        "steps": trainer.state.global_step,
        "first_logged_loss": losses[0] if losses else None,
        "last_logged_loss": losses[-1] if losses else None,
        "train_windows": len(train_set),
        "eval_windows": len(eval_set),
        "train_time_s": round(t1 - t0, 1),
        "eval_time_s": round(t2 - t1, 1),
        "wall_time_s": round(t2 - t_start, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = config_parser(__doc__)
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args(argv)
    setup_logging()
    config = config_from_args(args)
    if config.time_budget is not None:
        raise ValueError(
            "the Trainer has no time budget: give the run a fixed length (--time-budget none, with "
            "--epochs or --max-steps), and the same to scripts/train.py for the comparison"
        )
    result = train_and_score(config)
    print(json.dumps(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"config": config.to_dict(), **result}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    run(main)
