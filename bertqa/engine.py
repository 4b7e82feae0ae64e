"""The training loop: plain functions on top of Accelerate, and `fit`, which reads the config and wires them up.

Accelerate owns devices, mixed precision, DDP and gradient accumulation. Everything is counted in optimizer updates
("steps"); a micro-batch is one forward pass. Research hooks, lowest rung first: change a config field; pass your
own model/tokenizer/examples to `fit`; pass `compute_loss(model, batch)` and `callbacks` (called after each update);
compose your own loop from `train_one_epoch` and `bertqa.inference.evaluate`; copy `train_one_epoch`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from bertqa import checkpoint
from bertqa.batching import LengthGroupedBatchSampler, model_inputs, train_loader
from bertqa.cache import RunData, prepare_data
from bertqa.data import Example, Features, check_labels
from bertqa.inference import eval_batches, evaluate, make_accelerator, resolve_precision
from bertqa.model import check_model_limits
from bertqa.optim import build_optimizer, build_scheduler, count_updates, fused_adamw_applies, set_hyperparameters
from bertqa.reporting import LogMeter, RunRecorder, log_plan

if TYPE_CHECKING:
    from accelerate import Accelerator

    from bertqa.config import TrainConfig

__all__ = [
    "NonFiniteLossError",
    "RunData",
    "TrainState",
    "Update",
    "default_loss",
    "fit",
    "make_accelerator",
    "prepare_data",
    "train_one_epoch",
]

logger = logging.getLogger("bertqa")
LossFn = Callable[[torch.nn.Module, dict[str, torch.Tensor]], torch.Tensor]
Callback = Callable[["Update"], None]


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite."""


@dataclass
class Update:
    """What callbacks see after each optimizer update. `loss` stays on the device: reading it is a sync point."""

    step: int
    epoch: int
    lr: float
    loss: torch.Tensor


@dataclass
class TrainState:
    """Loop position, saved in every checkpoint so a resumed run continues at the same micro-batch."""

    step: int = 0
    epoch: int = 0
    batches_done: int = 0  # micro-batches of `epoch` already consumed
    best_f1: float = -1.0

    def state_dict(self) -> dict[str, Any]:
        return dict(vars(self))

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)


def default_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean of the start and end cross-entropy over the real tokens of each window.

    The models' built-in QA loss lets padding positions into the softmax, so the same window would get a different
    loss in a batch padded further; masking them makes the objective independent of how batches are padded.
    """
    out = model(**model_inputs(batch))
    padding = batch["attention_mask"] == 0
    losses = [
        torch.nn.functional.cross_entropy(logits.float().masked_fill(padding, -1e9), batch[target])
        for logits, target in ((out.start_logits, "start_positions"), (out.end_logits, "end_positions"))
    ]
    return (losses[0] + losses[1]) / 2


def train_one_epoch(
    accelerator: Accelerator,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    loader: torch.utils.data.DataLoader,
    *,
    state: TrainState,
    max_steps: int,
    max_grad_norm: float = 1.0,
    log_every: int = 10,
    compute_loss: LossFn = default_loss,
    callbacks: Sequence[Callback] = (),
    on_log: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, float]:
    """One pass over `loader` (or until `max_steps` updates). Returns the pass's `train_loss` (mean over its
    updates), `updates` and `train_time_s`.

    The loss is read from the device only every `log_every` updates and at the end of the pass; that is also where
    a non-finite loss is caught.
    """
    model.train()
    meter, t0, updates = LogMeter(accelerator.device), time.perf_counter(), 0
    update_loss, micro = torch.zeros((), device=accelerator.device), 0
    for batch in loader:
        if state.step >= max_steps:
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
        update = Update(step=state.step, epoch=state.epoch, lr=scheduler.get_last_lr()[0], loss=update_loss / micro)
        meter.add_update(update.loss)
        update_loss, micro = torch.zeros((), device=accelerator.device), 0
        if meter.updates == log_every or state.step >= max_steps:
            _log(meter, update, accelerator.num_processes, on_log)
        for callback in callbacks:
            callback(update)
    if meter.updates:  # the pass ended between two log points
        _log(meter, update, accelerator.num_processes, on_log)
    return {"train_loss": meter.pass_mean(), "updates": updates, "train_time_s": time.perf_counter() - t0}


def _log(meter: LogMeter, update: Update, num_processes: int, on_log: Callable[[dict], None] | None) -> None:
    record = meter.read(step=update.step, epoch=update.epoch, lr=update.lr, num_processes=num_processes)
    if not math.isfinite(record["loss"]):
        raise NonFiniteLossError(
            f"training loss is {record['loss']} around step {update.step} (lr {update.lr:.3g}); lower the learning "
            "rate, check the data, or use bf16 instead of fp16. Checkpoints saved so far are intact."
        )
    if on_log is not None:
        on_log(record)


# ------------------------------------------------------------------------------------------------------------- fit
# `fit` and the private helpers that read its config for it. Everything above takes explicit arguments.


@dataclass
class _Training:
    """The prepared model, optimizer, schedule and data order of a run, and how long it is."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    loader: Any  # Accelerate's DataLoaderShard
    sampler: LengthGroupedBatchSampler
    state: TrainState
    per_epoch: int
    total_steps: int
    warmup_steps: int

    def epoch_loader(self, accelerator: Accelerator) -> Any:
        """This epoch's batches, or what is left of them when a resumed run starts mid-epoch."""
        # Both: Accelerate's loader re-seeds the sampler from its own pass counter, which a resumed run does not share.
        self.sampler.set_epoch(self.state.epoch)
        self.loader.set_epoch(self.state.epoch)
        done = self.state.batches_done
        return accelerator.skip_first_batches(self.loader, done) if done else self.loader

    def end_pass(self) -> None:
        if self.state.batches_done >= len(self.loader):  # a whole epoch: the next pass starts on the next one
            self.state.epoch, self.state.batches_done = self.state.epoch + 1, 0


def _build_training(
    config: TrainConfig, accelerator: Accelerator, model: torch.nn.Module, features: Features, pad_token_id: int
) -> _Training:
    if config.compile:
        model = torch.compile(model, dynamic=True)
    loader, sampler = train_loader(
        features,
        batch_size=config.batch_size,
        seed=config.seed,
        group_by_length=config.group_by_length,
        pad_token_id=pad_token_id,
        pad_to_multiple_of=config.pad_to_multiple_of,
        num_workers=config.num_workers,
        pin_memory=accelerator.device.type == "cuda",
    )
    fused = fused_adamw_applies(accelerator.device.type)
    optimizer = build_optimizer(model, lr=config.lr, weight_decay=config.weight_decay, eps=config.adam_eps, fused=fused)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    per_epoch, total = count_updates(
        len(loader), grad_accum=config.grad_accum, epochs=config.epochs, max_steps=config.max_steps
    )
    warmup = round(config.warmup_ratio * total)
    scheduler = build_scheduler(optimizer, total_steps=total, warmup_steps=warmup, schedule=config.schedule)
    state = TrainState()
    accelerator.register_for_checkpointing(scheduler, state)
    return _Training(model, optimizer, scheduler, loader, sampler, state, per_epoch, total, warmup)


@dataclass
class _Evaluation:
    """Evaluate, record, and keep the best model by F1: the same at epoch ends, mid-epoch and before training."""

    accelerator: Accelerator
    loader: torch.utils.data.DataLoader
    examples: Sequence[Example]
    recorder: RunRecorder
    tokenizer: Any
    meta: dict[str, Any]  # written to bertqa.json beside a saved model
    best_model: Path | None  # where the best model by F1 is kept (None: not saved)
    calibration: tuple[torch.utils.data.DataLoader, Sequence[Example]] | None = None  # SQuAD v2 threshold data

    def __call__(self, model: torch.nn.Module, state: TrainState, **train_stats: float) -> dict[str, Any]:
        v2, longest = self.meta["v2"], self.meta["max_answer_length"]
        calibrated: dict[str, float] = {}
        if self.calibration is not None:  # the no-answer threshold, chosen on held-out training questions
            cal, _ = evaluate(self.accelerator, model, *self.calibration, v2=True, max_answer_length=longest,
                              progress=True)  # fmt: skip
            calibrated = {"no_answer_threshold": cal["best_f1_thresh"], "calibration_best_f1": cal["best_f1"]}
        threshold = calibrated.get("no_answer_threshold", 0.0)
        metrics, _ = evaluate(self.accelerator, model, self.loader, self.examples, v2=v2, max_answer_length=longest,
                              threshold=threshold, progress=True)  # fmt: skip
        record = {"step": state.step, "epoch": state.epoch, **train_stats, **metrics, **calibrated}
        self.recorder.log_eval(record)
        if self.best_model is not None and metrics["f1"] > state.best_f1:
            self.save_model(model, self.best_model, record)
        state.best_f1 = max(state.best_f1, metrics["f1"])
        return record

    def save_model(self, model: torch.nn.Module, path: Path, record: dict[str, Any]) -> None:
        checkpoint.save_model(self.accelerator, model, self.tokenizer, path, {**self.meta, "eval": record})


def _build_evaluation(
    config: TrainConfig, accelerator: Accelerator, tokenizer: Any, data: RunData, recorder: RunRecorder
) -> _Evaluation:
    def batches(features: Features) -> torch.utils.data.DataLoader:
        return eval_batches(features, batch_size=config.eval_batch_size, pad_token_id=tokenizer.pad_token_id,
                            pad_to_multiple_of=config.pad_to_multiple_of, accelerator=accelerator)  # fmt: skip

    meta = checkpoint.model_meta(config, data)
    on = data.calibration_examples
    calibration = (batches(data.calibration_features), on) if meta["v2"] and on else None
    best = Path(config.output_dir) / "best_model" if config.save_model else None
    return _Evaluation(accelerator, batches(data.eval_features), data.eval_examples, recorder, tokenizer, meta, best,
                       calibration)  # fmt: skip


def _periodic(
    update: Update,
    *,
    training: _Training,
    evaluation: _Evaluation,
    eval_every: int | None,
    save_every: int | None,
    keep: int,
    record: dict[str, Any],
) -> None:
    """Mid-epoch evaluation and checkpoints, as an update callback."""
    if eval_every and update.step % eval_every == 0 and update.step < training.total_steps:
        evaluation(training.model, training.state)
        training.model.train()
    if save_every and update.step % save_every == 0:
        if not torch.isfinite(update.loss):  # never let a NaN step overwrite good checkpoints
            raise NonFiniteLossError(f"training loss is {update.loss.item()} at step {update.step}")
        checkpoint.save_checkpoint(
            evaluation.accelerator, evaluation.recorder.out, update.step, keep=keep, config=record
        )


def fit(
    config: TrainConfig,
    *,
    model: torch.nn.Module | None = None,
    tokenizer: Any = None,
    train_examples: Sequence[Example] | None = None,
    eval_examples: Sequence[Example] | None = None,
    compute_loss: LossFn = default_loss,
    callbacks: Sequence[Callback] = (),
) -> dict[str, Any]:
    """Train and evaluate as `config` says; return a summary of the run (steps, times, final and best scores).

    Anything passed in replaces what the config would build: your own model, tokenizer or examples.
    """
    from accelerate.utils import set_seed

    from bertqa.model import build_model, build_tokenizer

    out = Path(config.output_dir)
    resume_from, record = checkpoint.resume_point(config)
    accelerator = _build_accelerator(config)
    set_seed(config.seed)
    tokenizer = tokenizer if tokenizer is not None else build_tokenizer(config.model)
    check_model_limits(model if model is not None else config.model, tokenizer, config.window)
    with accelerator.main_process_first():  # the main process fills the window cache, the others read it
        data = prepare_data(config, tokenizer, train_examples=train_examples, eval_examples=eval_examples)
        labels = check_labels(data.train_features, data.train_examples, min_match_rate=config.label_check_min)
    if model is None:
        model = build_model(config.model, attn_implementation=config.attn_implementation,
                            attention_dropout=config.attention_dropout)  # fmt: skip
    elif config.attention_dropout is not None:
        logger.warning("attention_dropout applies to models fit builds; the model passed in keeps its own")
    run = _build_training(config, accelerator, model, data.train_features, tokenizer.pad_token_id)
    if resume_from is not None:
        accelerator.load_state(str(resume_from))
        set_hyperparameters(run.optimizer, run.scheduler, lr=config.lr, weight_decay=config.weight_decay,
                            eps=config.adam_eps)  # fmt: skip
        logger.info("resumed from %s at step %d (epoch %d)", resume_from, run.state.step, run.state.epoch)
    recorder = RunRecorder(
        out, is_main=accelerator.is_main_process, total_steps=run.total_steps, step=run.state.step,
        tracker_log=accelerator.log,
    )  # fmt: skip
    recorder.start(record, resumed_at=run.state.step if resume_from is not None else None,
                   initial_lr=run.scheduler.get_last_lr()[0])  # fmt: skip
    accelerator.init_trackers("bertqa", config={k: str(v) for k, v in config.to_dict().items()})
    log_plan(data, labels, accelerator, run, batch=config.batch_size * config.grad_accum * accelerator.num_processes)
    evaluation = _build_evaluation(config, accelerator, tokenizer, data, recorder)
    periodic = partial(
        _periodic, training=run, evaluation=evaluation, eval_every=config.eval_every_steps,
        save_every=config.save_every_steps, keep=config.keep_checkpoints, record=record,
    )  # fmt: skip

    t_start, train_time = time.perf_counter(), 0.0
    last_eval = evaluation(run.model, run.state) if config.eval_before_training and run.state.step == 0 else {}
    while run.state.step < run.total_steps:
        stats = train_one_epoch(
            accelerator, run.model, run.optimizer, run.scheduler, run.epoch_loader(accelerator), state=run.state,
            max_steps=run.total_steps, max_grad_norm=config.max_grad_norm, log_every=config.log_every,
            compute_loss=compute_loss, callbacks=[recorder.on_update, periodic, *callbacks], on_log=recorder.log_train,
        )  # fmt: skip
        train_time += stats["train_time_s"]
        run.end_pass()
        pass_stats = {"train_loss": stats["train_loss"]} if stats["updates"] else {}
        last_eval = evaluation(run.model, run.state, **pass_stats)
        checkpoint.save_checkpoint(accelerator, out, run.state.step, keep=config.keep_checkpoints, config=record)
    if last_eval.get("step") != run.state.step:  # resumed after the final checkpoint: its evaluation is on record
        last_eval = recorder.eval_record_at(run.state.step) or evaluation(run.model, run.state)
    if config.save_model:
        evaluation.save_model(run.model, out / "final_model", last_eval)
    recorder.finish(title=f"bertqa: {config.model}")
    accelerator.end_training()
    return {
        "steps": run.state.step,
        "epochs_done": run.state.epoch,
        "train_time_s": train_time,
        "wall_time_s": time.perf_counter() - t_start,
        "final": last_eval,
        "best_f1": run.state.best_f1,
        "label_report": labels,
        "output_dir": str(out),
    }


def _build_accelerator(config: TrainConfig) -> Accelerator:
    from accelerate.tracking import get_available_trackers

    available = sorted(str(getattr(t, "value", t)) for t in get_available_trackers())
    missing = [name for name in config.report_to if name not in available and name != "all"]
    if missing:  # Accelerate would only warn, and the run would go unrecorded
        raise ValueError(
            f"report_to names trackers that are not installed: {', '.join(missing)} (installed: "
            f"{', '.join(available) or 'none'}); pip install {' '.join(missing)}, or leave them out"
        )
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = config.tf32
    return make_accelerator(
        mixed_precision=resolve_precision(config.mixed_precision),
        gradient_accumulation_steps=config.grad_accum,
        log_with=list(config.report_to) or None,
        project_dir=config.output_dir,
        step_scheduler_with_optimizer=False,
        timeout_s=config.collective_timeout_s,
    )
