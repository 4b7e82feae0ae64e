"""The training loop: `train_one_epoch` (one pass of updates), `train` (passes until the run ends, its hooks told
what happens) and `fit`, which reads the config, builds a run (`bertqa.training.setup`) and trains it.

Accelerate owns devices, mixed precision, DDP and gradient accumulation. Everything is counted in optimizer updates
("steps"); a micro-batch is one forward pass. Research hooks, lowest rung first: change a config field; pass your
own model/tokenizer/examples to `fit`; pass `compute_loss(model, batch)` (built on `qa_loss`); pass `hooks`
(`Hook` subclasses: start, update, evaluation, save, pass end and end events, state kept across a resume), or plain
`callbacks` (after each update) and `on_evaluate` observers; any of them may raise `StopTraining`. Compose your own
loop from `make_accelerator`, `DataOrder`, `train_one_epoch` and `bertqa.inference.evaluate` (`recipes/own_loop.py`);
copy `train_one_epoch`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from bertqa.batching import DataOrder, model_inputs
from bertqa.training import setup
from bertqa.training.hooks import EarlyStopping, Hook, Run
from bertqa.training.loss import Batch, LossFn, default_loss, qa_loss
from bertqa.training.runtime import make_accelerator, peak_memory
from bertqa.training.state import (
    Interrupted,
    LogMeter,
    NonFiniteLossError,
    StopTraining,
    TrainState,
    Update,
    notify,
)

if TYPE_CHECKING:
    from accelerate import Accelerator

    from bertqa.config import TrainConfig

__all__ = [
    "DataOrder",
    "EarlyStopping",
    "Hook",
    "Interrupted",
    "NonFiniteLossError",
    "Run",
    "StopTraining",
    "TrainState",
    "Update",
    "default_loss",
    "fit",
    "make_accelerator",
    "model_inputs",
    "notify",
    "qa_loss",
    "train",
    "train_one_epoch",
]

Callback = Callable[[Update], None]
EvalObserver = Callable[[Mapping[str, Any]], None]
OptimizerFactory = Callable[[torch.nn.Module], torch.optim.Optimizer]  # as `bertqa.training.optim` names it


def train_one_epoch(
    accelerator: Accelerator,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    loader: Iterable[Batch],
    *,
    state: TrainState,
    max_steps: int,
    max_grad_norm: float = 1.0,
    log_every: int = 10,
    compute_loss: LossFn = default_loss,
    callbacks: Sequence[Callback] = (),
    on_log: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, float]:
    """One pass over `loader`, until `max_steps` updates (or `state.end_step`, when a callback moved the end,
    earlier or later), or until a callback raises `StopTraining` (then `state.stop_reason` is set, and a loop of
    your own should end: `while state.step < total and state.stop_reason is None`). Returns the pass's
    `train_loss` (mean over its updates), `updates` and `train_time_s`.

    The loss is read from the device only every `log_every` updates and at the end of the pass; that is also where
    a non-finite loss is caught.
    """
    model.train()
    meter, t0, updates = LogMeter(accelerator.device), time.perf_counter(), 0
    update_loss, micro, grad_norm = torch.zeros((), device=accelerator.device), 0, None
    for batch in loader:
        last = max_steps if state.end_step is None else state.end_step  # a callback may move it
        if state.step >= last or state.stop_reason is not None:
            break
        with accelerator.accumulate(model):
            loss = compute_loss(model, batch)
            accelerator.backward(loss)
            if accelerator.sync_gradients and max_grad_norm > 0:
                grad_norm = accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        state.batches_done += 1
        update_loss, micro = update_loss + loss.detach(), micro + 1
        meter.add_batch(batch)
        if not accelerator.sync_gradients:
            continue
        if not accelerator.optimizer_step_was_skipped:  # fp16 overflow: keep the schedule in step with real updates
            scheduler.step()
        state.step, updates = state.step + 1, updates + 1
        lr = max(scheduler.get_last_lr())  # the peak group's (with layer-wise LRs, the head's)
        update = Update(step=state.step, epoch=state.epoch, lr=lr, loss=update_loss / micro, grad_norm=grad_norm)
        meter.add_update(update.loss)
        update_loss, micro = torch.zeros((), device=accelerator.device), 0
        if meter.updates == log_every or state.step >= last:
            _log(meter, update, accelerator, on_log)
        notify(callbacks, update, state)
    if meter.updates:  # the pass ended between two log points
        _log(meter, update, accelerator, on_log)
    return {"train_loss": meter.pass_mean(), "updates": updates, "train_time_s": time.perf_counter() - t0}


def _log(meter: LogMeter, update: Update, accelerator: Accelerator, on_log: Callable[[dict], None] | None) -> None:
    several = accelerator.num_processes > 1  # every process logs the run's mean loss, and stops on it together
    record = meter.read(
        step=update.step,
        epoch=update.epoch,
        lr=update.lr,
        num_processes=accelerator.num_processes,
        reduce=partial(accelerator.reduce, reduction="mean") if several else None,
    )
    if not math.isfinite(record["loss"]):
        raise NonFiniteLossError(
            f"training loss is {record['loss']} around step {update.step} (lr {update.lr:.3g}); lower the learning "
            "rate, check the data, or use bf16 instead of fp16. Checkpoints saved so far are intact."
        )
    if on_log is not None:
        on_log(record)


def train(run: Run) -> dict[str, Any]:
    """`fit`'s loop: passes of `train_one_epoch` until the run's updates are done or a hook stops it. The hooks
    decide what happens around them (evaluations, checkpoints, records, the time budget's warm-up and plan)."""
    state, t0 = run.state, time.perf_counter()
    run.hooks.start(run)
    while state.step < run.end and state.stop_reason is None:
        stats = run.train_pass()
        run.order.end_pass(state)
        run.hooks.pass_end(run, stats)
    run.finished = True
    if state.stop_reason is not None:  # also a stop before training: the checkpoint keeps it, so a resume stays stopped
        run.save()
    summary = {
        "steps": state.step,
        "epochs_done": state.epoch,
        "train_time_s": run.train_time_s,
        "wall_time_s": time.perf_counter() - t0,
        "final": run.final_evaluation(),
        "best_f1_seen": state.best_f1,  # of every evaluation: a record's best_f1 is its best-threshold F1
        "stopped_early": state.stop_reason,
        "budget_plan": state.budget_plan,
        **peak_memory(run.accelerator),
    }
    run.hooks.end(run, summary)
    return summary


def fit(
    config: TrainConfig,
    *,
    model: torch.nn.Module | None = None,
    tokenizer: Any = None,
    train_examples: Sequence[Any] | Any | None = None,
    eval_examples: Sequence[Any] | Any | None = None,
    compute_loss: LossFn = default_loss,
    hooks: Sequence[Hook] = (),
    callbacks: Sequence[Callback] = (),
    on_evaluate: Sequence[EvalObserver] = (),
    optimizer: OptimizerFactory | None = None,
) -> dict[str, Any]:
    """Train and evaluate as `config` says; return a summary (steps, times, the `final` evaluation record, the best F1
    of every evaluation `best_f1_seen`, `stopped_early`).

    Anything passed in replaces what the config would build: your own model, tokenizer or examples (`Example`s,
    records in the schema the files use, or a `datasets.Dataset` of them; training examples without evaluation data
    hold out a tenth of themselves), your own `optimizer` (a factory: `optimizer(model)` returns it; the schedule is
    still bertqa's, counted in updates). `hooks` are told each event of the run (`Hook`) and keep their state across
    a resume; `callbacks` get an `Update` after every optimizer update, `on_evaluate` observers every evaluation
    record (a line of `metrics.jsonl`); any of them may end the run by raising `StopTraining`. A `config.teacher`
    makes the loss `bertqa.distill.Distillation` (give it or your own loss). Its log lines (logger "bertqa": what
    was loaded, the plan, each evaluation) are shown on stderr when the program has set up no logging of its own.

    Ctrl-C or SIGTERM (to any process) stops the run after the update in progress with a checkpoint of it, and
    raises `Interrupted` (a KeyboardInterrupt) naming that checkpoint; `resume="latest"` continues from it exactly.
    """
    c = config
    with setup.run_context() as signals:
        setup.refuse_bad_settings(c, model=model, tokenizer=tokenizer, compute_loss=compute_loss, hooks=hooks)
        resume_from, record = setup.resume_point(c)
        accelerator = setup.make_accelerator(c)
        tokenizer = setup.load_tokenizer(c, model=model, tokenizer=tokenizer)
        loss = setup.build_loss(c, compute_loss, tokenizer=tokenizer, accelerator=accelerator)
        data = setup.load_data(
            c, accelerator, tokenizer=tokenizer, train_examples=train_examples, eval_examples=eval_examples
        )
        model = setup.build_model(c, model)
        run = setup.build_run(
            c,
            accelerator,
            model,
            data,
            tokenizer=tokenizer,
            loss=loss,
            optimizer=optimizer,
            record=record,
            train_one_epoch=train_one_epoch,
        )
        setup.build_hooks(c, run, signals, callbacks=callbacks, on_evaluate=on_evaluate, hooks=hooks)
        setup.begin(c, run, data, signals, tokenizer=tokenizer, resume_from=resume_from)
        try:
            summary = train(run)
        except Interrupted as stop:
            raise setup.interrupted(run, stop) from None
        finally:  # an error's one line then starts on a line of its own, not after the bar
            run.recorder.bar.close()
        setup.finish(run)
    return {**summary, "label_report": data.labels, "output_dir": str(Path(c.output_dir))}
