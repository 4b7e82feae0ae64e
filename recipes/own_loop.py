"""Recipe: a training loop of your own, built only from bertqa's public pieces.

The same examples, windows, optimizer, schedule, data order and evaluation as `engine.fit` with the same settings,
so it gets the same loss curve (tests/test_recipes.py checks that); change any line to make it yours. It prepares
its scheduler the usual Accelerate way: `engine.make_accelerator` steps a prepared schedule once per optimizer
update, whatever the number of processes. Run it again with --resume to continue from its last checkpoint.

  python recipes/own_loop.py --train-data dev-v1.1 --max-train-examples 500 --output-dir runs/own-loop
  accelerate launch --num_processes 2 recipes/own_loop.py --train-data dev-v1.1 --max-train-examples 500
"""

from __future__ import annotations

import argparse
import json
from functools import partial

from accelerate.utils import set_seed

from bertqa import batching, cache, engine, inference, sources
from bertqa.cli import run, script_parser, setup_logging
from bertqa.data import Window, check_labels
from bertqa.model import build_model, build_tokenizer
from bertqa.training import checkpoint, optim, runtime
from bertqa.training.interrupt import Interrupted, SignalCatcher


def train(a: argparse.Namespace) -> list[dict]:
    """Train and evaluate as the flags say; returns the training log (one record per `--log-every` updates)."""
    accelerator = engine.make_accelerator(mixed_precision=runtime.resolve_precision(a.mixed_precision))
    set_seed(a.seed)  # before the model is built: the QA head's initialisation
    tokenizer = build_tokenizer(a.model)
    window = Window(a.max_seq_length, a.doc_stride, a.max_query_length)
    with accelerator.main_process_first():  # the main process fills the window cache, the others read it
        examples = sources.run_examples(
            a.train_data,
            eval_data=a.eval_data,
            max_train_examples=a.max_train_examples,
            max_eval_examples=a.max_eval_examples,
            seed=a.seed,
        )
        data = cache.prepare_data(examples, tokenizer, window=window, cache_dir=a.cache_dir)
    check_labels(data.train_features, examples.train)  # labels that do not decode to the answers stop the run here
    model = build_model(a.model)
    loader, sampler = batching.train_loader(
        data.train_features,
        batch_size=a.batch_size,
        seed=a.seed,
        group_by_length=True,
        pad_token_id=tokenizer.pad_token_id,
    )
    fused = optim.fused_adamw_applies(accelerator.device.type)
    optimizer = optim.build_optimizer(model, lr=a.lr, weight_decay=0.01, eps=1e-8, fused=fused)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    _, total = optim.count_updates(len(loader), grad_accum=1, epochs=a.epochs, max_steps=None)
    scheduler = optim.build_scheduler(optimizer, total_steps=total, warmup_steps=round(0.1 * total))
    scheduler = accelerator.prepare(scheduler)
    state, order = engine.TrainState(), engine.DataOrder(loader, sampler)
    accelerator.register_for_checkpointing(state)  # the prepared model, optimizer and scheduler are saved anyway
    if a.resume and (last := checkpoint.latest_checkpoint(a.output_dir)) is not None:
        accelerator.load_state(str(last))  # the checkpoint's schedule and data order; change neither when resuming
        print(f"resumed from {last} at update {state.step} of {total}", flush=True)
    eval_loader = inference.eval_batches(
        data.eval_features, batch_size=64, pad_token_id=tokenizer.pad_token_id, accelerator=accelerator
    )
    log: list[dict] = []
    with SignalCatcher() as signals:  # Ctrl-C or SIGTERM: finish the update, save it, stop (a second: stop now)
        try:
            while state.step < total and state.stop_reason is None:  # a callback may raise engine.StopTraining
                engine.train_one_epoch(
                    accelerator,
                    model,
                    optimizer,
                    scheduler,
                    order.batches(accelerator, state),
                    state=state,
                    max_steps=total,
                    log_every=a.log_every,
                    on_log=log.append,
                    callbacks=[partial(signals.check, accelerator)],
                )
                order.end_pass(state)
                metrics, _ = inference.evaluate(accelerator, model, eval_loader, examples.eval, v2=examples.v2)
                checkpoint.save_checkpoint(accelerator, a.output_dir, state.step, keep=1)
                if accelerator.is_main_process:
                    print(json.dumps({"step": state.step, "epoch": state.epoch, "f1": metrics["f1"]}), flush=True)
        except Interrupted as stop:
            if stop.at_once:
                raise
            saved = checkpoint.save_checkpoint(accelerator, a.output_dir, state.step, keep=1)
            raise Interrupted(
                stop.signum,
                step=state.step,
                total_steps=total,
                checkpoint=saved,
                resume_hint="run the same command with --resume to continue",
            ) from None
    if a.log_json and accelerator.is_main_process:
        with open(a.log_json, "w") as f:
            json.dump(log, f)
    # As fit does: the prepared (DistributedDataParallel) model is let go and the process group shut down here, not
    # left to the interpreter's exit, where either aborts the process about half the time ("terminate called
    # without an active exception"). On an error, `bertqa.cli.run` shuts the group down.
    model = optimizer = None
    runtime.end_processes(accelerator)
    return log


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = script_parser(__doc__)
    p.add_argument("--model", default="minilm-l6", help="model alias, folder or hub id")
    p.add_argument("--train-data", default="train-v1.1", help="anything --train-data of scripts/train.py takes")
    p.add_argument("--eval-data", default="dev-v1.1", help="evaluation data (same forms)")
    p.add_argument("--max-train-examples", type=int, help="seeded subset of the training questions")
    p.add_argument("--max-eval-examples", type=int, default=1000, help="seeded subset of the evaluation questions")
    for name, default in Window().to_dict().items():
        p.add_argument("--" + name.replace("_", "-"), type=int, default=default, help="window setting")
    p.add_argument("--batch-size", type=int, default=32, help="windows per batch on each process")
    p.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (10%% warmup, then linear decay)")
    p.add_argument("--epochs", type=float, default=1.0, help="passes over the training windows")
    p.add_argument("--seed", type=int, default=42, help="seed for initialisation, subsets and order")
    p.add_precision(help="auto: bf16 where native")
    p.add_argument("--log-every", type=int, default=10, help="log the loss every N updates")
    p.add_argument("--cache-dir", default="~/.cache/bertqa", help="window cache (none: off)")
    p.add_argument("--output-dir", default="runs/own-loop", help="checkpoints go to OUTPUT_DIR/checkpoints")
    p.add_flag("--resume", help="continue from the newest checkpoint in --output-dir")
    p.add_argument("--log-json", help="also write the training log here (JSON list)")
    args = p.parse_args(argv)
    args.cache_dir = None if args.cache_dir.lower() in ("", "none") else args.cache_dir
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
    train(args)
    return 0


if __name__ == "__main__":
    run(main)
