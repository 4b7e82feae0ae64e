"""The training loop: the pieces a loop is made of, and `fit`, which reads the config and puts them together.

Accelerate owns devices, mixed precision, DDP and gradient accumulation. Everything is counted in optimizer updates
("steps"); a micro-batch is one forward pass. Research hooks, lowest rung first: change a config field; pass your
own model/tokenizer/examples to `fit`; pass `compute_loss(model, batch)` (built on `qa_loss`), `callbacks` (after
each update) and `on_evaluate` observers (after each evaluation), any of which may raise `StopTraining`; compose
your own loop from `make_accelerator`, `DataOrder`, `train_one_epoch` and `bertqa.inference.evaluate` (the
`recipes/` folder has one); copy `train_one_epoch`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from bertqa.batching import DataOrder, LengthGroupedBatchSampler, model_inputs, train_loader
from bertqa.cache import prepare_data
from bertqa.config import computation_changes
from bertqa.data import Example, check_labels
from bertqa.inference import eval_batches, evaluate
from bertqa.model import check_model_limits
from bertqa.sources import DEFAULT_NO_ANSWER_THRESHOLD, run_examples
from bertqa.training import checkpoint
from bertqa.training.budget import (
    PROBE_UPDATES,
    BudgetPlan,
    BudgetSpec,
    BudgetTooSmall,
    Deadline,
    format_duration,
    parse_duration,
    plan_run,
)
from bertqa.training.interrupt import Interrupted, SignalCatcher, signal_name
from bertqa.training.optim import (
    OptimizerFactory,
    build_optimizer,
    build_scheduler,
    count_updates,
    describe_groups,
    fused_adamw_applies,
    hyperparameters,
    reschedule,
    restore_hyperparameters,
)
from bertqa.training.reporting import LogMeter, RunRecorder, console_logging, log_plan
from bertqa.training.runtime import (
    check_trackers,
    make_accelerator,
    precision_reason,
    resolve_precision,
    slowest_process,
)
from bertqa.training.state import EarlyStopping, StopTraining, TrainState, Update, count_evaluations, notify

if TYPE_CHECKING:
    from accelerate import Accelerator

    from bertqa.config import TrainConfig

__all__ = [
    "DataOrder",
    "EarlyStopping",
    "Interrupted",
    "NonFiniteLossError",
    "StopTraining",
    "TrainState",
    "Update",
    "default_loss",
    "fit",
    "make_accelerator",
    "model_inputs",
    "notify",
    "qa_loss",
    "train_one_epoch",
]

logger = logging.getLogger("bertqa")
Batch = dict[str, torch.Tensor]
LossFn = Callable[[torch.nn.Module, Batch], torch.Tensor]
Callback = Callable[["Update"], None]
EvalObserver = Callable[[Mapping[str, Any]], None]


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite."""


def qa_loss(start_logits: torch.Tensor, end_logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Mean of the start and end cross-entropy over the real tokens of each window, against the batch's labels.

    The models' built-in QA loss lets padding positions into the softmax, so the same window would get a different
    loss in a batch padded further; masking them makes the objective independent of how batches are padded.
    Pure: give it logits computed once (for a distillation or smoothing term beside it) and the batch they came from.
    """
    padding = batch["attention_mask"] == 0
    losses = [
        torch.nn.functional.cross_entropy(logits.float().masked_fill(padding, -1e9), batch[target])
        for logits, target in ((start_logits, "start_positions"), (end_logits, "end_positions"))
    ]
    return (losses[0] + losses[1]) / 2


def default_loss(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """The model on the batch's inputs (`model_inputs`: never the labels, or it computes its own unmasked loss),
    scored by `qa_loss`."""
    out = model(**model_inputs(batch))
    return qa_loss(out.start_logits, out.end_logits, batch)


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
    """One pass over `loader`, until `max_steps` updates (or `state.end_step`, when a callback moved the end
    earlier), or until a callback raises `StopTraining` (then
    `state.stop_reason` is set, and a loop of your own should end: `while state.step < total and state.stop_reason
    is None`). Returns the pass's `train_loss` (mean over its updates), `updates` and `train_time_s`.

    The loss is read from the device only every `log_every` updates and at the end of the pass; that is also where
    a non-finite loss is caught.
    """
    model.train()
    meter, t0, updates = LogMeter(accelerator.device), time.perf_counter(), 0
    update_loss, micro = torch.zeros((), device=accelerator.device), 0
    for batch in loader:
        last = max_steps if state.end_step is None else min(max_steps, state.end_step)  # a callback may move it
        if state.step >= last or state.stop_reason is not None:
            break
        with accelerator.accumulate(model):
            loss = compute_loss(model, batch)
            accelerator.backward(loss)
            if accelerator.sync_gradients and max_grad_norm > 0:
                accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
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
        update = Update(step=state.step, epoch=state.epoch, lr=lr, loss=update_loss / micro)
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
    record = meter.read(step=update.step, epoch=update.epoch, lr=update.lr, num_processes=accelerator.num_processes,
                        reduce=partial(accelerator.reduce, reduction="mean") if several else None)  # fmt: skip
    if not math.isfinite(record["loss"]):
        raise NonFiniteLossError(
            f"training loss is {record['loss']} around step {update.step} (lr {update.lr:.3g}); lower the learning "
            "rate, check the data, or use bf16 instead of fp16. Checkpoints saved so far are intact."
        )
    if on_log is not None:
        on_log(record)


# ------------------------------------------------------------------------------------------------------------- fit
# `fit` reads the config and hands explicit values to the private helpers below it.


@dataclass
class _Training:
    """The prepared model, optimizer, schedule and data order of a run, and how long it is."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    order: DataOrder
    state: TrainState
    per_epoch: int
    total_steps: int
    warmup_steps: int
    hyperparameters: list[dict[str, float]]  # as built: what a resumed run's own settings put back


def _build_training(
    accelerator: Accelerator,
    model: torch.nn.Module,
    loader: torch.utils.data.DataLoader,
    sampler: LengthGroupedBatchSampler,
    make_optimizer: OptimizerFactory,
    *,
    grad_accum: int,
    epochs: float,
    max_steps: int | None,
    warmup_ratio: float,
    schedule: str,
) -> _Training:
    optimizer = make_optimizer(model)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    per_epoch, total = count_updates(len(loader), grad_accum=grad_accum, epochs=epochs, max_steps=max_steps)
    warmup = round(warmup_ratio * total)
    scheduler = build_scheduler(optimizer, total_steps=total, warmup_steps=warmup, schedule=schedule)
    inner = getattr(optimizer, "optimizer", optimizer)  # the optimizer inside Accelerate's wrapper
    logger.info("optimizer %s, parameter groups:\n%s", type(inner).__name__, describe_groups(optimizer))
    state = TrainState()
    accelerator.register_for_checkpointing(scheduler, state)
    order = DataOrder(loader, sampler)
    return _Training(model, optimizer, scheduler, order, state, per_epoch, total, warmup, hyperparameters(optimizer))


@dataclass
class _Evaluation:
    """The one evaluation path of `fit`, before training, mid-epoch, at epoch ends and at a stop: evaluate (with the
    v2 threshold calibrated first), record, tell the observers, and keep the best model by F1."""

    accelerator: Accelerator
    loader: torch.utils.data.DataLoader
    examples: Sequence[Example]
    recorder: RunRecorder
    tokenizer: Any
    meta: dict[str, Any]  # written to bertqa.json beside a saved model
    best_model: Path | None  # where the best model by F1 is kept (None: not saved)
    calibration: tuple[torch.utils.data.DataLoader, Sequence[Example]] | None  # SQuAD v2 threshold data
    observers: Sequence[EvalObserver]
    last: dict[str, Any]  # the latest record
    signals: SignalCatcher  # Ctrl-C and SIGTERM: checked after each evaluation
    seconds: float = 0.0  # how long the latest evaluation took
    fixed_threshold: float | None = None  # a v2 run without calibration: its no-answer threshold

    def __call__(self, model: torch.nn.Module, state: TrainState, **train_stats: float) -> dict[str, Any]:
        t0 = time.perf_counter()
        v2, longest = self.meta["v2"], self.meta["max_answer_length"]
        calibrated: dict[str, float] = {}
        # One process may drop an evaluation at a signal (the checkpoint does not need it); several finish it
        # together, since a process that left it would keep the others waiting for its share.
        alone = self.accelerator.num_processes == 1
        with self.signals.immediately(alone):
            if self.calibration is not None:  # the no-answer threshold, chosen on held-out training questions
                cal, _ = evaluate(self.accelerator, model, *self.calibration, v2=True, max_answer_length=longest,
                                  progress=True)  # fmt: skip
                calibrated = {"no_answer_threshold": cal["best_f1_thresh"], "calibration_best_f1": cal["best_f1"]}
            elif self.fixed_threshold is not None:
                calibrated = {"no_answer_threshold": self.fixed_threshold}
            threshold = calibrated.get("no_answer_threshold", 0.0)
            metrics, _ = evaluate(self.accelerator, model, self.loader, self.examples, v2=v2,
                                  max_answer_length=longest, threshold=threshold, progress=True)  # fmt: skip
        record = {"step": state.step, "epoch": state.epoch, **train_stats, **metrics, **calibrated}
        self.recorder.log_eval(record)
        # The untrained model of an evaluation before training is a baseline, never kept as the best model.
        if self.best_model is not None and state.step > 0 and metrics["f1"] > state.best_model_f1:
            self.save_model(model, self.best_model, record)
            state.best_model_f1 = metrics["f1"]
        state.best_f1 = max(state.best_f1, metrics["f1"])
        self.last, self.seconds = record, time.perf_counter() - t0
        notify(self.observers, record, state)
        self.signals.check(self.accelerator)
        return record

    def save_model(self, model: torch.nn.Module, path: Path, record: dict[str, Any]) -> None:
        checkpoint.save_model(self.accelerator, model, self.tokenizer, path, {**self.meta, "eval": record})


def _periodic(
    update: Update, *, run: _Training, evaluation: _Evaluation, eval_every: int | None, save_every: int | None,
    save: Callable[[int], Any], wait_for_plan: bool = False,
) -> None:  # fmt: skip
    """Mid-epoch evaluation and checkpoints, as an update callback. An update that ends a pass or the run is left
    to the end-of-pass evaluation, which records the pass's training loss beside it. A time-budget run's timed
    warm-up (`wait_for_plan` before its plan) is not interrupted: those updates are what it measures."""
    if wait_for_plan and run.state.budget_plan is None:
        return
    ends_pass = run.state.batches_done >= len(run.order) or update.step >= run.total_steps
    if eval_every and update.step % eval_every == 0 and not ends_pass:
        evaluation(run.model, run.state)
        run.model.train()
    if save_every and update.step % save_every == 0:
        if not torch.isfinite(update.loss):  # never let a NaN step overwrite good checkpoints
            raise NonFiniteLossError(f"training loss is {update.loss.item()} at step {update.step}")
        save(update.step)


def _interrupted(
    run: _Training, save: Callable[[int], Path], recorder: RunRecorder, signum: int, *, title: str
) -> Interrupted:
    """The run stops at a signal: a checkpoint of the update it finished (the one saved there, when it was), a
    line in metrics.jsonl, the curves so far; the `Interrupted` to raise names the checkpoint."""
    folder = save(run.state.step)
    recorder.log_stop(step=run.state.step, epoch=run.state.epoch, reason=f"interrupted by {signal_name(signum)}",
                      key="interrupted")  # fmt: skip
    recorder.finish(title=title)
    return Interrupted(signum, step=run.state.step, total_steps=run.total_steps, checkpoint=folder)


def _plan_budget(
    accelerator: Accelerator,
    run: _Training,
    evaluation: _Evaluation,
    one_pass: Callable[..., dict[str, float]],
    spec: BudgetSpec,
    deadline: Deadline,
    record: dict[str, Any],
    *,
    patience: int | None,
    eval_first: bool,
) -> BudgetPlan:
    """A fresh time-budget run: `bertqa.training.budget.plan_run` trains and times the warm-up and plans; here the plan is
    applied and recorded (`record` is the config that `config.json` and every checkpoint save)."""
    loaders = [evaluation.loader] + ([evaluation.calibration[0]] if evaluation.calibration else [])
    try:
        plan = plan_run(accelerator, run.order, run.state, run.model, one_pass, spec, deadline,
                        total_steps=run.total_steps, per_epoch=run.per_epoch, eval_s=evaluation.seconds,
                        eval_loaders=loaders)  # fmt: skip
    except BudgetTooSmall as err:  # the folder holds only this attempt's records: say how to try again there
        raise BudgetTooSmall(f"{err}; to try again in {evaluation.recorder.out}, add --overwrite true") from err
    _apply_plan(run, plan, schedule=spec.schedule, record=record)
    ends = time.strftime("%H:%M:%S", time.localtime(time.time() + plan.expected_s - plan.spent_s))
    logger.info("%s (at about %s)", plan.describe(), ends)
    if (
        patience is not None
        and count_evaluations(
            total=plan.total_steps, per_epoch=plan.per_epoch, eval_every=spec.eval_every, eval_first=eval_first
        )
        < patience + 1
    ):
        logger.warning("early_stopping_patience=%d cannot end this run as planned: it evaluates too seldom before "
                       "its last update (evaluate more often: eval_every_steps)", patience)  # fmt: skip
    evaluation.recorder.replan(record, total_steps=plan.total_steps)
    return plan


def _apply_plan(run: _Training, plan: BudgetPlan, *, schedule: str, record: dict[str, Any]) -> None:
    """Cut the run to its plan: its questions, its length, and a schedule that ends at its last update (with the
    times it was shortened, on resume); the plan goes into the state and into `record`, the config that config.json
    and every checkpoint save."""
    run.state.budget_plan = record["_budget_plan"] = plan.to_dict()
    run.order.sampler.limit = plan.questions if plan.questions < plan.pool_questions else None
    run.total_steps, run.per_epoch, run.warmup_steps = plan.total_steps, plan.per_epoch, plan.warmup_steps
    if plan.from_step:  # planned again mid-run: from the LR where it stood down to 0, as a shortening does
        reschedule(run.scheduler, total_steps=plan.planned_steps, warmup_steps=plan.warmup_steps, schedule=schedule,
                   shortened_at=plan.from_step)  # fmt: skip
    else:
        reschedule(run.scheduler, total_steps=plan.planned_steps, warmup_steps=plan.warmup_steps, schedule=schedule)
    for at, total in plan.shortened:
        reschedule(run.scheduler, total_steps=total, warmup_steps=plan.warmup_steps, schedule=schedule, shortened_at=at)


def _shorten(
    run: _Training, recorder: RunRecorder, record: dict[str, Any], at: int, total: int, *, schedule: str
) -> None:
    """A time-budget run fell behind its plan (`Deadline`): it ends at update `total` instead, its LR decaying from
    where it is at update `at` to 0 there; recorded in the plan, so a resumed run has the same schedule."""
    plan = BudgetPlan.from_dict(run.state.budget_plan)
    logger.warning("behind the time budget's plan at update %d: the run now ends at update %d instead of %d, its LR "
                   "decaying to 0 there", at, total, plan.total_steps)  # fmt: skip
    plan = dataclasses.replace(plan, total_steps=total, shortened=(*plan.shortened, (at, total)))
    run.state.budget_plan = record["_budget_plan"] = plan.to_dict()
    run.total_steps = run.state.end_step = total
    reschedule(run.scheduler, total_steps=total, warmup_steps=plan.warmup_steps, schedule=schedule, shortened_at=at)
    recorder.replan(record, total_steps=total)


def _resume_plan(run: _Training, budget_s: float | None, *, schedule: str, record: dict[str, Any]) -> None:
    """A resumed time-budget run keeps the plan it made at its start; with another budget (accepted as a change)
    it is planned again from where it stands."""
    saved = run.state.budget_plan
    if saved is None or budget_s is None:
        return
    if budget_s == saved["budget_s"]:
        _apply_plan(run, BudgetPlan.from_dict(saved), schedule=schedule, record=record)
        return
    logger.info("the plan made for a time budget of %s is dropped (the budget is now %s): planning again from update "
                "%d", format_duration(saved["budget_s"]), format_duration(budget_s), run.state.step)  # fmt: skip
    run.state.budget_plan = run.state.end_step = None


def _save_counted(save: Callable[[int], Any], deadline: Deadline, step: int) -> Any:
    """Save a checkpoint holding the budget's seconds up to it (an evaluation may have run since the last update)."""
    deadline.used()
    return save(step)


def fit(
    config: TrainConfig,
    *,
    model: torch.nn.Module | None = None,
    tokenizer: Any = None,
    train_examples: Sequence[Example] | Any | None = None,
    eval_examples: Sequence[Example] | Any | None = None,
    compute_loss: LossFn = default_loss,
    callbacks: Sequence[Callback] = (),
    on_evaluate: Sequence[EvalObserver] = (),
    optimizer: OptimizerFactory | None = None,
) -> dict[str, Any]:
    """Train and evaluate as `config` says; return a summary (steps, times, final and best scores, `stopped_early`).

    Anything passed in replaces what the config would build: your own model, tokenizer or examples (`Example`s,
    records in the schema the files use, or a `datasets.Dataset` of them; training examples without evaluation data
    hold out a tenth of themselves), your own `optimizer` (a factory: `optimizer(model)` returns it; the schedule is
    still bertqa's, counted in updates). `callbacks` get an `Update` after every optimizer update, `on_evaluate`
    observers every evaluation record (a line of `metrics.jsonl`); any of them may end the run by raising
    `StopTraining`. A `config.teacher` makes the loss `bertqa.distill.Distillation` (give it or your own loss).

    Its log lines (logger "bertqa": what was loaded, the plan, each evaluation) are shown on stderr when the program
    has set up no logging of its own.

    Ctrl-C or SIGTERM (to any process) stops the run after the update in progress with a checkpoint of it, and
    raises `Interrupted` (a KeyboardInterrupt) naming that checkpoint; `resume="latest"` continues from it exactly.
    """
    # Until there is something to save, a signal stops at once. A library user who set up no logging still sees
    # what the run loads, plans and scores, as the scripts show it.
    with console_logging(), SignalCatcher(at_once=True) as signals:
        return _fit(config, signals, model=model, tokenizer=tokenizer, train_examples=train_examples,
                    eval_examples=eval_examples, compute_loss=compute_loss, callbacks=callbacks,
                    on_evaluate=on_evaluate, optimizer=optimizer)  # fmt: skip


def _fit(
    config: TrainConfig,
    signals: SignalCatcher,
    *,
    model: torch.nn.Module | None,
    tokenizer: Any,
    train_examples: Sequence[Example] | Any | None,
    eval_examples: Sequence[Example] | Any | None,
    compute_loss: LossFn,
    callbacks: Sequence[Callback],
    on_evaluate: Sequence[EvalObserver],
    optimizer: OptimizerFactory | None,
) -> dict[str, Any]:
    from accelerate.utils import set_seed

    from bertqa.model import build_model, build_tokenizer, resolve_model

    c, out = config, Path(config.output_dir)
    if model is None or tokenizer is None:  # a misspelt model folder is said before the output folder is made
        resolve_model(c.model)
    budget_s = parse_duration(c.time_budget) if c.time_budget is not None else None
    if c.teacher is not None and compute_loss is not default_loss:
        raise ValueError("give a teacher or your own compute_loss, not both (build bertqa.distill.Distillation into "
                         "your loss to have both)")  # fmt: skip
    if c.teacher is not None and c.overwrite and Path(c.teacher).expanduser().resolve().is_relative_to(out.resolve()):
        raise ValueError(f"teacher {c.teacher} lies in output_dir {out}, which --overwrite would clear; copy it out")
    for name, needs in c.unused_settings():
        logger.warning("%s is set but has no effect without %s", name, needs)
    settings = c.to_dict()
    if c.teacher is not None:  # its weights' digest: a teacher retrained in the same folder is a change on resume
        from bertqa.distill import teacher_fingerprint

        settings["_teacher_weights"] = teacher_fingerprint(c.teacher)
    resume_from, record = checkpoint.resume_point(out, settings, resume=c.resume, overwrite=c.overwrite,
                                                  accept_changes=c.accept_changes)  # fmt: skip
    check_trackers(c.report_to)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = c.tf32
    accelerator = make_accelerator(mixed_precision=resolve_precision(c.mixed_precision), project_dir=c.output_dir,
                                   gradient_accumulation_steps=c.grad_accum, log_with=list(c.report_to) or None,
                                   timeout_s=c.collective_timeout_s)  # fmt: skip
    set_seed(c.seed)
    tokenizer = tokenizer if tokenizer is not None else build_tokenizer(c.model)
    check_model_limits(model if model is not None else c.model, tokenizer, c.window,
                       num_layers=c.num_layers if model is None else None)  # fmt: skip
    if c.teacher is not None:  # checked and loaded before any work on the data
        from bertqa.distill import Distillation, load_teacher

        teacher = load_teacher(c.teacher, student_tokenizer=tokenizer, device=accelerator.device, window=c.window)
        logger.info("distilling from teacher %s (alpha %g, temperature %g)", c.teacher, c.distill_alpha,
                    c.distill_temperature)  # fmt: skip
        compute_loss = Distillation(teacher, c.distill_alpha, c.distill_temperature, autocast=accelerator.autocast)
    with accelerator.main_process_first():  # the main process fills the window cache, the others read it
        examples = run_examples(**c.example_settings(), train_examples=train_examples, eval_examples=eval_examples)
        data = prepare_data(examples, tokenizer, window=c.window, cache_dir=c.cache_dir, num_proc=c.tokenize_workers)
        labels = check_labels(data.train_features, examples.train, min_match_rate=c.label_check_min)
    if model is None:
        model = build_model(c.model, attn_implementation=c.attn_implementation, attention_dropout=c.attention_dropout,
                            num_layers=c.num_layers, layer_pick=c.layer_pick)  # fmt: skip
    elif c.attention_dropout is not None or c.num_layers is not None:
        logger.warning("attention_dropout and num_layers apply to models fit builds; the model passed in keeps its own")
    loader, sampler = train_loader(data.train_features, batch_size=c.batch_size, seed=c.seed,
                                   group_by_length=c.group_by_length, pad_token_id=tokenizer.pad_token_id,
                                   pad_to_multiple_of=c.pad_to_multiple_of, num_workers=c.num_workers,
                                   pin_memory=accelerator.device.type == "cuda",
                                   question_order_first_pool=PROBE_UPDATES * c.grad_accum * accelerator.num_processes
                                   if budget_s else None)  # fmt: skip
    if optimizer is not None and c.layer_lr_decay != 1.0:
        logger.warning("layer_lr_decay applies to bertqa's own optimizer; the optimizer factory passed in sets its own")
    adamw = partial(build_optimizer, lr=c.lr, weight_decay=c.weight_decay, eps=c.adam_eps,
                    fused=fused_adamw_applies(accelerator.device.type), layer_lr_decay=c.layer_lr_decay)  # fmt: skip
    run = _build_training(accelerator, torch.compile(model, dynamic=True) if c.compile else model, loader, sampler,
                          optimizer or adamw, grad_accum=c.grad_accum, epochs=c.epochs, max_steps=c.max_steps,
                          warmup_ratio=c.warmup_ratio, schedule=c.schedule)  # fmt: skip
    if c.early_stopping_patience is not None:
        evaluations = count_evaluations(total=run.total_steps, per_epoch=run.per_epoch, eval_every=c.eval_every_steps,
                                        eval_first=c.eval_before_training)  # fmt: skip
        stopper = EarlyStopping.for_run(run.state, patience=c.early_stopping_patience,
                                        min_delta=c.early_stopping_min_delta, evaluations=evaluations)  # fmt: skip
        on_evaluate = [*on_evaluate, stopper]
    if resume_from is None and c.overwrite:  # every setting is checked now: only here is the earlier run removed
        checkpoint.clear_earlier_run(out)
    if resume_from is not None:
        checkpoint.load_checkpoint(accelerator, resume_from)
        _resume_plan(run, budget_s, schedule=c.schedule, record=record)
        restore_hyperparameters(run.optimizer, run.scheduler, run.hyperparameters)
        if run.state.stop_reason is not None and computation_changes(checkpoint.saved_config(resume_from) or {},
                                                                     settings):  # fmt: skip
            logger.info("the stop at update %d (%s) is lifted: settings were changed on resume", run.state.step,
                        run.state.stop_reason)  # fmt: skip
            run.state.stop_reason, run.state.evals_without_gain = None, 0
        logger.info("resumed from %s at step %d (epoch %d)", resume_from, run.state.step, run.state.epoch)
        if budget_s is not None and run.state.budget_plan is not None:
            logger.info("the time budget's plan goes on: %d updates in all, %s of %s used", run.total_steps,
                        format_duration(run.state.budget_used_s), format_duration(budget_s))  # fmt: skip
    recorder = RunRecorder(out, is_main=accelerator.is_main_process, total_steps=run.total_steps,
                           step=run.state.step, tracker_log=accelerator.log)  # fmt: skip
    signals.at_once = False  # from here on the run has a state to save: a signal stops it at the next update
    recorder.start(record, resumed_at=run.state.step if resume_from is not None else None,
                   initial_lr=run.scheduler.get_last_lr()[0])  # fmt: skip
    accelerator.init_trackers("bertqa", config={k: str(v) for k, v in c.to_dict().items()})
    log_plan(data, labels, accelerator, total_steps=run.total_steps, per_epoch=run.per_epoch,
             warmup_steps=run.warmup_steps, batch=c.batch_size * c.grad_accum * accelerator.num_processes,
             planned_later=budget_s is not None and run.state.budget_plan is None,
             disk=checkpoint.disk_cost(model, keep=c.keep_checkpoints, optimizer_state=c.save_optimizer_state,
                                       save_model=c.save_model))  # fmt: skip
    precision = precision_reason(c.mixed_precision, device=accelerator.device.type)
    logger.info("precision %s", precision)
    if budget_s is not None and run.state.budget_plan is None:
        ends = time.strftime("%H:%M:%S", time.localtime(time.time() + budget_s - run.state.budget_used_s))
        logger.info("time budget %s: the first %d updates are timed, then the run is planned so that its training "
                    "and evaluations end by about %s", format_duration(budget_s), PROBE_UPDATES, ends)  # fmt: skip
    windows = partial(eval_batches, batch_size=c.eval_batch_size, pad_token_id=tokenizer.pad_token_id,
                      pad_to_multiple_of=c.pad_to_multiple_of, accelerator=accelerator)  # fmt: skip
    meta = checkpoint.model_meta(examples, window=c.window, max_answer_length=c.max_answer_length,
                                 column_map=c.column_map)  # fmt: skip
    cal = data.calibration_features  # SQuAD v2 training data: the threshold's questions
    calibration = None if cal is None else (windows(cal), examples.calibration)
    fixed = DEFAULT_NO_ANSWER_THRESHOLD if examples.v2 and examples.calibration_off is not None else None
    evaluation = _Evaluation(accelerator, windows(data.eval_features), examples.eval, recorder, tokenizer, meta,
                             out / "best_model" if c.save_model else None, calibration, on_evaluate, {},
                             signals, fixed_threshold=fixed)  # fmt: skip
    save = partial(checkpoint.save_checkpoint, accelerator, out, keep=c.keep_checkpoints, config=record,
                   optimizer_state=c.save_optimizer_state)  # fmt: skip
    deadline = None
    if budget_s is not None:
        deadline = Deadline(
            run.state,
            budget_s=budget_s,
            eval_every=c.eval_every_steps,
            slowest=slowest_process(accelerator),
            check_every=1 if accelerator.num_processes == 1 else 5,
        )
        deadline.on_shorten = partial(_shorten, run, recorder, record, schedule=c.schedule)  # fmt: skip
        save = partial(_save_counted, save, deadline)
    periodic = partial(_periodic, run=run, evaluation=evaluation, eval_every=c.eval_every_steps,
                       save_every=c.save_every_steps, save=save, wait_for_plan=budget_s is not None)  # fmt: skip
    one_pass = partial(train_one_epoch, accelerator, run.model, run.optimizer, run.scheduler, state=run.state,
                       max_grad_norm=c.max_grad_norm, log_every=c.log_every, compute_loss=compute_loss,
                       callbacks=[recorder.on_update, periodic, *callbacks, *([deadline] if deadline else []),
                                  partial(signals.check, accelerator)],
                       on_log=recorder.log_train)  # fmt: skip
    plan = None
    if deadline is not None:
        spec = BudgetSpec(budget_s, precision.split(":")[0], c.grad_accum, c.warmup_ratio, c.schedule,
                          c.eval_every_steps, c.eval_batch_size, c.pad_to_multiple_of)  # fmt: skip
        plan = partial(_plan_budget, accelerator, run, evaluation, one_pass, spec, deadline, record,
                       patience=c.early_stopping_patience, eval_first=c.eval_before_training)  # fmt: skip
    try:
        summary = _train(accelerator, run, evaluation, one_pass, save, eval_first=c.eval_before_training,
                         final_model=out / "final_model" if c.save_model else None, plan=plan)  # fmt: skip
    except Interrupted as stop:
        if stop.at_once:  # a second signal: the checkpoints saved before are what is left
            raise
        interrupted = _interrupted(run, save, recorder, stop.signum, title=f"bertqa: {c.model}")
        accelerator.end_training()
        raise interrupted from None
    finally:  # an error's one line then starts on a line of its own, not after the bar
        recorder.bar.close()
    if signals.received is not None:  # it came while the final model was written: nothing was left to stop
        logger.info("the run had finished its updates when %s came: it is complete", signal_name(signals.received))
    recorder.finish(title=f"bertqa: {c.model}")
    accelerator.end_training()
    return {**summary, "label_report": labels, "output_dir": str(out)}


def _train(
    accelerator: Accelerator,
    run: _Training,
    evaluation: _Evaluation,
    one_pass: Callable[[Iterable[Batch]], dict[str, float]],
    save: Callable[[int], Any],
    *,
    eval_first: bool,
    final_model: Path | None,
    plan: Callable[[], BudgetPlan] | None = None,
) -> dict[str, Any]:
    """`fit`'s loop: passes of `train_one_epoch` (`one_pass`), each followed by an evaluation and a checkpoint,
    until the run's updates are done or it is stopped; then the final model. A time-budget run first trains its
    timed warm-up and makes its `plan`."""
    state = run.state
    if state.stop_reason is not None:
        logger.info("this run was stopped at update %d (%s): nothing is left to train", state.step, state.stop_reason)
    elif 0 < run.total_steps <= state.step:
        logger.info("this run had done all its %d updates: nothing is left to train", run.total_steps)
    t_start, train_time = time.perf_counter(), 0.0
    if eval_first and state.step == 0 and state.stop_reason is None:
        evaluation(run.model, state)
    # Resumed at an epoch end whose evaluation a signal dropped (only one process drops one, so only its records
    # are read here): that evaluation comes first.
    at_epoch_end = state.batches_done == 0 and 0 < state.step < run.total_steps and state.stop_reason is None
    if at_epoch_end and accelerator.num_processes == 1 and evaluation.recorder.eval_record_at(state.step) is None:
        evaluation(run.model, state)
    if plan is not None and state.budget_plan is None and state.stop_reason is None and state.step < run.total_steps:
        t0 = time.perf_counter()
        plan()  # trains the timed warm-up updates
        train_time += time.perf_counter() - t0
    while state.step < run.total_steps and state.stop_reason is None:
        stats = one_pass(run.order.batches(accelerator, state), max_steps=run.total_steps)
        train_time += stats["train_time_s"]
        run.order.end_pass(state)
        if evaluation.last.get("step") != state.step:  # a stop may have come from an evaluation at this update
            evaluation(run.model, state, **({"train_loss": stats["train_loss"]} if stats["updates"] else {}))
        save(state.step)
        evaluation.signals.check(accelerator)  # one that came during the save: stop here, not an update later
    if state.stop_reason is not None:  # also when an evaluation before training stopped it: resuming keeps the stop
        evaluation.recorder.log_stop(step=state.step, epoch=state.epoch, reason=state.stop_reason)
        save(state.step)
    last_eval = evaluation.last
    if last_eval.get("step") != state.step:  # resumed after the final checkpoint: its evaluation is on record
        last_eval = evaluation.recorder.eval_record_at(state.step) or evaluation(run.model, state)
    if final_model is not None:
        evaluation.save_model(run.model, final_model, last_eval)
    return {
        "steps": state.step,
        "epochs_done": state.epoch,
        "train_time_s": train_time,
        "wall_time_s": time.perf_counter() - t_start,
        "final": last_eval,
        "best_f1": state.best_f1,
        "stopped_early": state.stop_reason,
        "budget_plan": state.budget_plan,
    }
