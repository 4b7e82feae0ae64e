"""Each step of `bertqa.engine.fit`, built from a `TrainConfig`: refuse bad settings before anything is written, find
the resume point, make the accelerator, load the tokenizer, loss, data and model, build the `Run` and its hooks,
begin (resume or clear an earlier run, records, the plan line), and end (after an interrupt, or as usual).

Only this module reads the config for a run: everything it builds takes explicit values, so a loop of your own can
use the same pieces (`recipes/own_loop.py`).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from bertqa import batching, inference
from bertqa.cache import prepare_data
from bertqa.card import provenance
from bertqa.config import computation_changes
from bertqa.data import check_labels
from bertqa.model import check_model_limits, model_depth, model_name
from bertqa.sources import DEFAULT_NO_ANSWER_THRESHOLD, run_examples
from bertqa.training import checkpoint, optim, runtime
from bertqa.training.budget import PROBE_UPDATES, BudgetSpec, TimeBudget, parse_duration
from bertqa.training.evaluation import Evaluator
from bertqa.training.hooks import (
    Callbacks,
    EarlyStopping,
    Hook,
    Hooks,
    Periodic,
    Records,
    Run,
    SaveFinalModel,
    Signals,
    count_evaluations,
)
from bertqa.training.interrupt import SignalCatcher
from bertqa.training.loss import LossFn, default_loss
from bertqa.training.reporting import RunRecorder, console_logging, log_plan
from bertqa.training.state import Interrupted, TrainState, signal_name

if TYPE_CHECKING:
    from accelerate import Accelerator

    from bertqa.config import TrainConfig

__all__ = [
    "Data",
    "adapt",
    "begin",
    "build_hooks",
    "build_loss",
    "build_model",
    "build_run",
    "check_hooks",
    "finish",
    "interrupted",
    "load_data",
    "load_tokenizer",
    "make_accelerator",
    "refuse_bad_settings",
    "resume_point",
    "run_context",
]

logger = logging.getLogger("bertqa")

# Said at the start of a run with gradient_checkpointing (measured in docs/MEMORY.md).
GRADIENT_CHECKPOINTING_COST = (
    "gradient checkpointing: each encoder layer keeps only its input and computes the rest again in the backward "
    "pass, so training holds a fraction of the activations at about 1.3-1.4x the time of an update (docs/MEMORY.md)"
)


@contextlib.contextmanager
def run_context() -> Iterator[SignalCatcher]:
    """Show bertqa's log lines when the program set up no logging, and catch Ctrl-C and SIGTERM; until there is
    something to save (`begin`), a signal stops at once."""
    with console_logging(), SignalCatcher(at_once=True) as signals:
        yield signals


def refuse_bad_settings(
    c: TrainConfig, *, model: Any, tokenizer: Any, compute_loss: LossFn, hooks: Sequence[Any] = ()
) -> None:
    """What can be refused before the output folder is touched: a misspelt model folder, a time budget that is not
    a duration, a teacher beside a loss of one's own or inside a folder --overwrite would clear, hooks that are
    not hooks."""
    from bertqa.model import refuse_adapter, resolve_model

    check_hooks(hooks)

    if model is None or tokenizer is None:
        refuse_adapter(c.model)
        resolve_model(c.model)
    if c.time_budget is not None:
        parse_duration(c.time_budget)
    if c.teacher is not None and compute_loss is not default_loss:
        raise ValueError(
            "give a teacher or your own compute_loss, not both (build bertqa.distill.Distillation into your loss "
            "to have both)"
        )
    out = Path(c.output_dir)
    if c.teacher is not None and c.overwrite and Path(c.teacher).expanduser().resolve().is_relative_to(out.resolve()):
        raise ValueError(f"teacher {c.teacher} lies in output_dir {out}, which --overwrite would clear; copy it out")
    for name, needs in c.unused_settings():
        logger.warning("%s is set but has no effect without %s", name, needs)


def resume_point(c: TrainConfig) -> tuple[Path | None, dict[str, Any]]:
    """The checkpoint to resume from (None: a fresh run) and the settings record that config.json and every
    checkpoint save (the config, and a teacher's weights' digest: a teacher retrained in place is a change)."""
    settings = c.to_dict()
    if c.teacher is not None:
        from bertqa.distill import teacher_fingerprint

        settings["_teacher_weights"] = teacher_fingerprint(c.teacher)
    return checkpoint.resume_point(
        Path(c.output_dir), settings, resume=c.resume, overwrite=c.overwrite, accept_changes=c.accept_changes
    )


def make_accelerator(c: TrainConfig) -> Accelerator:
    """The run's Accelerator (precision, accumulation, trackers, collective timeout), and its seed set."""
    from accelerate.utils import set_seed

    runtime.check_trackers(c.report_to)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = c.tf32
    accelerator = runtime.make_accelerator(
        mixed_precision=runtime.resolve_precision(c.mixed_precision),
        project_dir=c.output_dir,
        gradient_accumulation_steps=c.grad_accum,
        log_with=list(c.report_to) or None,
        timeout_s=c.collective_timeout_s,
    )
    if c.lora_r and (kind := runtime.sharding(accelerator)):
        raise ValueError(
            f"lora_r with {kind}: a LoRA run saves its model by merging the adapters into a whole copy of it, which a "
            "sharded model is not; train LoRA with data parallelism (its optimizer state is small: nothing to shard)"
        )
    set_seed(c.seed)
    return accelerator


def load_tokenizer(c: TrainConfig, *, model: Any, tokenizer: Any) -> Any:
    """The tokenizer (the one passed in, or the model's), checked against the model's limits and the window."""
    from bertqa.model import build_tokenizer

    tokenizer = tokenizer if tokenizer is not None else build_tokenizer(c.model)
    num_layers = c.num_layers if model is None else None
    check_model_limits(model if model is not None else c.model, tokenizer, c.window, num_layers=num_layers)
    return tokenizer


def build_loss(c: TrainConfig, compute_loss: LossFn, *, tokenizer: Any, accelerator: Accelerator) -> LossFn:
    """The loss: `compute_loss`, or distillation from `c.teacher` (checked and loaded before any work on the data)."""
    if c.teacher is None:
        return compute_loss
    from bertqa.distill import Distillation, load_teacher

    teacher = load_teacher(c.teacher, student_tokenizer=tokenizer, device=accelerator.device, window=c.window)
    logger.info(
        "distilling from teacher %s (alpha %g, temperature %g)", c.teacher, c.distill_alpha, c.distill_temperature
    )
    return Distillation(teacher, c.distill_alpha, c.distill_temperature, autocast=accelerator.autocast)


@dataclass
class Data:
    """A run's examples, their windows, and the label self-check's report."""

    examples: Any  # `bertqa.sources.RunExamples`
    windows: Any  # `bertqa.cache.PreparedData`
    labels: dict[str, Any]


def load_data(
    c: TrainConfig, accelerator: Accelerator, *, tokenizer: Any, train_examples: Any, eval_examples: Any
) -> Data:
    """The examples (the config's sources, or those passed in), their windows, and the label self-check."""
    with accelerator.main_process_first():  # the main process fills the window cache, the others read it
        examples = run_examples(**c.example_settings(), train_examples=train_examples, eval_examples=eval_examples)
        windows = prepare_data(examples, tokenizer, window=c.window, cache_dir=c.cache_dir, num_proc=c.tokenize_workers)
        labels = check_labels(windows.train_features, examples.train, min_match_rate=c.label_check_min)
    return Data(examples, windows, labels)


def build_model(c: TrainConfig, model: torch.nn.Module | None) -> torch.nn.Module:
    """The model the config names, or the one passed in (which keeps its own initial weights and settings)."""
    from bertqa.model import build_model as build

    if model is None:
        model = build(
            c.model,
            attn_implementation=c.attn_implementation,
            attention_dropout=c.attention_dropout,
            hidden_dropout=c.hidden_dropout,
            num_layers=c.num_layers,
            layer_pick=c.layer_pick,
        )
        return adapt(c, model)
    # Its weights were drawn before fit set the seed: only the seed in force when it was built makes them repeatable.
    logger.info(
        "the model passed in was built before fit set seed %d: its initial weights come from the seed in force when "
        "it was built (call accelerate.utils.set_seed(%d) before building it to repeat a run exactly)",
        c.seed,
        c.seed,
    )
    if c.attention_dropout is not None or c.hidden_dropout is not None or c.num_layers is not None:
        logger.warning(
            "attention_dropout, hidden_dropout and num_layers apply to models fit builds; the model passed in keeps "
            "its own"
        )
    return adapt(c, model)


def adapt(c: TrainConfig, model: torch.nn.Module) -> torch.nn.Module:
    """The model as the run trains it: activations recomputed in the backward pass (`gradient_checkpointing`),
    LoRA adapters on a frozen base (`lora_r`), the parts `freeze_embeddings` and `freeze_layers` name no longer
    trained; each said in the log, with how much of the model trains."""
    if c.gradient_checkpointing:
        checkpoint_activations(model)
    if c.lora_r:
        from bertqa.adapters import add_lora, is_lora, lora_targets

        if is_lora(model):
            raise ValueError(
                f"lora_r={c.lora_r}: the model passed in already has peft adapters; set lora_r 0 to train them as "
                "they are"
            )
        targets = lora_targets(model, c.lora_targets)
        model = add_lora(model, r=c.lora_r, alpha=c.lora_alpha, dropout=c.lora_dropout, targets=targets)
        alpha = model.peft_config["default"].lora_alpha  # the one add_lora chose where lora_alpha is unset
        what = f"LoRA r={c.lora_r} (alpha {alpha:g}, dropout {c.lora_dropout:g}) on {', '.join(targets)}"
        _say_trainable(model, f"{what}, the QA head trained in full")
    if c.freeze_embeddings or c.freeze_layers:
        optim.freeze_bottom(model, embeddings=c.freeze_embeddings, layers=c.freeze_layers)
        parts = ["the embeddings"] if c.freeze_embeddings else []
        parts += [f"the lowest {c.freeze_layers} layers"] if c.freeze_layers else []
        _say_trainable(model, f"frozen: {' and '.join(parts)}")
    return model


def _say_trainable(model: torch.nn.Module, what: str) -> None:
    from bertqa.adapters import describe_trainable

    trainable, total = describe_trainable(model)
    share = 100 * trainable / total
    shown = f"{share:.2g}" if share < 10 else f"{share:.0f}"  # 0.91%, 47%
    logger.info("%s; trainable: %s%% of %.1fM parameters", what, shown, total / 1e6)


def checkpoint_activations(model: torch.nn.Module) -> None:
    """transformers' activation (gradient) checkpointing, said with what it costs: each encoder layer keeps only
    its input in the forward pass and computes the rest again in the backward pass."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(
            f"gradient_checkpointing: {type(model).__name__} does not support it; set gradient_checkpointing false"
        )
    # Non-reentrant checkpointing: gradients reach the layers' inputs even where the embeddings are frozen.
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers 5; gradient_checkpointing_enable before
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    logger.info(GRADIENT_CHECKPOINTING_COST)


def build_run(
    c: TrainConfig,
    accelerator: Accelerator,
    model: torch.nn.Module,
    data: Data,
    *,
    tokenizer: Any,
    loss: LossFn,
    optimizer: optim.OptimizerFactory | None,
    record: dict[str, Any],
    train_one_epoch: Callable[..., dict[str, float]],
) -> Run:
    """The prepared model, optimizer, schedule and data order, the run's length, how it trains one pass
    (`train_one_epoch` with these pieces) and how it writes a checkpoint."""
    loader, sampler = _train_loader(c, accelerator, data, pad_token_id=tokenizer.pad_token_id)
    make_optimizer = _optimizer_factory(c, accelerator, optimizer)
    model = torch.compile(model, dynamic=True) if c.compile else model
    made = make_optimizer(model)
    model, made, loader = accelerator.prepare(model, made, loader)
    per_epoch, total = optim.count_updates(len(loader), grad_accum=c.grad_accum, epochs=c.epochs, max_steps=c.max_steps)
    warmup = round(c.warmup_ratio * total)
    scheduler = optim.build_scheduler(made, total_steps=total, warmup_steps=warmup, schedule=c.schedule)
    inner = getattr(made, "optimizer", made)  # the optimizer inside Accelerate's wrapper
    logger.info("optimizer %s, parameter groups:\n%s", type(inner).__name__, optim.describe_groups(made))
    state = TrainState()
    accelerator.register_for_checkpointing(scheduler, state)
    one_pass = partial(
        train_one_epoch,
        accelerator,
        model,
        made,
        scheduler,
        state=state,
        max_grad_norm=c.max_grad_norm,
        log_every=c.log_every,
        compute_loss=loss,
    )
    return Run(
        accelerator=accelerator,
        model=model,
        optimizer=made,
        scheduler=scheduler,
        order=batching.DataOrder(loader, sampler),
        state=state,
        per_epoch=per_epoch,
        total_steps=total,
        warmup_steps=warmup,
        hyperparameters=optim.hyperparameters(made),
        output_dir=Path(c.output_dir),
        record=record,
        one_pass=one_pass,
        checkpoint=partial(
            checkpoint.save_checkpoint,
            accelerator,
            Path(c.output_dir),
            keep=c.keep_checkpoints,
            config=record,
            optimizer_state=c.save_optimizer_state,
        ),
    )


def _optimizer_factory(
    c: TrainConfig, accelerator: Accelerator, optimizer: optim.OptimizerFactory | None
) -> optim.OptimizerFactory:
    """The optimizer factory passed in, or bertqa's AdamW as the config sets it."""
    if optimizer is not None and c.layer_lr_decay != 1.0:
        logger.warning("layer_lr_decay applies to bertqa's own optimizer; the optimizer factory passed in sets its own")
    return optimizer or partial(
        optim.build_optimizer,
        lr=c.lr,
        weight_decay=c.weight_decay,
        eps=c.adam_eps,
        fused=optim.fused_adamw_applies(accelerator.device.type),
        layer_lr_decay=c.layer_lr_decay,
    )


def _train_loader(c: TrainConfig, accelerator: Accelerator, data: Data, *, pad_token_id: int) -> tuple[Any, Any]:
    # A time-budget run draws whole questions in a seeded order, so the warm-up's pool is fixed before it is timed.
    budget_pool = PROBE_UPDATES * c.grad_accum * accelerator.num_processes if c.time_budget is not None else None
    return batching.train_loader(
        data.windows.train_features,
        batch_size=c.batch_size,
        seed=c.seed,
        group_by_length=c.group_by_length,
        pad_token_id=pad_token_id,
        pad_to_multiple_of=c.pad_to_multiple_of,
        num_workers=c.num_workers,
        pin_memory=accelerator.device.type == "cuda",
        question_order_first_pool=budget_pool,
    )


def build_hooks(
    c: TrainConfig,
    run: Run,
    signals: SignalCatcher,
    *,
    callbacks: Sequence[Callable[..., None]],
    on_evaluate: Sequence[Callable[..., None]],
    hooks: Sequence[Hook],
) -> Hooks:
    """The run's hooks, in the order they are told each event: records, the final model, the user's callbacks and
    hooks, early stopping, evaluations and checkpoints, the time budget, signals. A feature that is off is not
    there. Their states are saved with the run's `TrainState`: a checkpoint comes after every hook before it has
    seen the update, so it holds their states as of that update."""
    made: list[Hook] = [Records(title=f"bertqa: {c.model}")]
    if c.save_model:  # before the user's hooks: their on_end finds the final model saved
        made.append(SaveFinalModel(run.output_dir / "final_model"))
    if callbacks or on_evaluate:
        made.append(Callbacks(callbacks, on_evaluate))
    made.extend(hooks)
    if c.early_stopping_patience is not None:
        made.append(_early_stopping(c, run))
    made.append(
        Periodic(eval_every=c.eval_every_steps, save_every=c.save_every_steps, eval_first=c.eval_before_training)
    )
    if c.time_budget is not None:  # after the evaluations: an update's time holds the evaluation made at it
        made.append(_time_budget(c, run))
    made.append(Signals(signals))
    run.hooks = Hooks(made)
    return run.hooks


def _early_stopping(c: TrainConfig, run: Run) -> EarlyStopping:
    evaluations = count_evaluations(
        total=run.total_steps, per_epoch=run.per_epoch, eval_every=c.eval_every_steps, eval_first=c.eval_before_training
    )
    return EarlyStopping.for_run(
        run.state, patience=c.early_stopping_patience, min_delta=c.early_stopping_min_delta, evaluations=evaluations
    )


def _time_budget(c: TrainConfig, run: Run) -> TimeBudget:
    precision = runtime.precision_reason(c.mixed_precision, device=run.accelerator.device.type)
    spec = BudgetSpec(
        budget_s=parse_duration(c.time_budget),
        precision=precision.split(":")[0],
        grad_accum=c.grad_accum,
        warmup_ratio=c.warmup_ratio,
        schedule=c.schedule,
        eval_every=c.eval_every_steps,
        eval_batch_size=c.eval_batch_size,
        pad_to_multiple_of=c.pad_to_multiple_of,
        freeze_below=c.budget_freeze_below,
        freeze_layers=c.budget_freeze_layers,
    )
    several = run.accelerator.num_processes > 1
    return TimeBudget(
        run.state,
        spec,
        slowest=runtime.slowest_process(run.accelerator),
        check_every=5 if several else 1,
        patience=c.early_stopping_patience,
        eval_first=c.eval_before_training,
    )


def begin(
    c: TrainConfig,
    run: Run,
    data: Data,
    signals: SignalCatcher,
    *,
    tokenizer: Any,
    resume_from: Path | None,
) -> None:
    """Resume from `resume_from` (or clear an earlier run that --overwrite replaces: only now, with every setting
    checked), then start the records and the evaluation, and log the plan."""
    if resume_from is None and c.overwrite:
        checkpoint.clear_earlier_run(run.output_dir)
    if resume_from is not None:
        _resume(run, resume_from)
    run.recorder = RunRecorder(
        run.output_dir,
        is_main=run.accelerator.is_main_process,
        total_steps=run.total_steps,
        step=run.state.step,
        tracker_log=run.accelerator.log,
    )
    signals.at_once = False  # from here on the run has a state to save: a signal stops it at the next update
    resumed_at = run.state.step if resume_from is not None else None
    run.recorder.start(run.record, resumed_at=resumed_at, initial_lr=run.scheduler.get_last_lr()[0])
    run.accelerator.init_trackers("bertqa", config={k: str(v) for k, v in c.to_dict().items()})
    _log_plan(c, run, data)
    run.evaluator = _evaluator(c, run, data, signals, tokenizer=tokenizer)


def _resume(run: Run, folder: Path) -> None:
    """Load the checkpoint (the hooks' states with it), let the hooks act on it, and put back the run's own
    hyperparameters; a stop is lifted when the settings that decide the computation were changed."""
    checkpoint.load_checkpoint(run.accelerator, folder)
    run.hooks.load_state_dict(run.state.hooks)
    # What the checkpoint holds: saving it again would add nothing.
    run.saved, run.saved_folder = (run.state.step, run.state.stop_reason), folder
    run.hooks.resume(run, folder)
    optim.restore_hyperparameters(run.optimizer, run.scheduler, run.hyperparameters)
    state = run.state
    if state.stop_reason is not None and computation_changes(checkpoint.saved_config(folder) or {}, run.record):
        logger.info(
            "the stop at update %d (%s) is lifted: settings were changed on resume", state.step, state.stop_reason
        )
        state.stop_reason, state.evals_without_gain = None, 0
    logger.info("resumed from %s at step %d (epoch %d)", folder, state.step, state.epoch)


def _log_plan(c: TrainConfig, run: Run, data: Data) -> None:
    disk = checkpoint.disk_cost(
        run.model, keep=c.keep_checkpoints, optimizer_state=c.save_optimizer_state, save_model=c.save_model
    )
    log_plan(
        data.windows,
        data.labels,
        run.accelerator,
        total_steps=run.total_steps,
        per_epoch=run.per_epoch,
        warmup_steps=run.warmup_steps,
        batch=c.batch_size * c.grad_accum * run.accelerator.num_processes,
        planned_later=c.time_budget is not None and run.state.budget_plan is None,
        disk=disk,
    )
    logger.info("precision %s", runtime.precision_reason(c.mixed_precision, device=run.accelerator.device.type))


def _evaluator(c: TrainConfig, run: Run, data: Data, signals: SignalCatcher, *, tokenizer: Any) -> Evaluator:
    windows = partial(
        inference.eval_batches,
        batch_size=c.eval_batch_size,
        pad_token_id=tokenizer.pad_token_id,
        pad_to_multiple_of=c.pad_to_multiple_of,
        accelerator=run.accelerator,
    )
    examples = data.examples
    meta = checkpoint.model_meta(
        examples,
        window=c.window,
        max_answer_length=c.max_answer_length,
        column_map=c.column_map,
        eval_column_map=c.eval_column_map,
        skip_bad_records=c.skip_bad_records,
    )
    # What the model was made from: the base a LoRA adapter goes back on, shortened as a student was.
    trained = run.accelerator.unwrap_model(run.model)
    meta |= {"base_model": model_name(trained), "num_layers": c.num_layers, "layer_pick": c.layer_pick}
    try:
        meta["depth"] = model_depth(trained.config)
    except ValueError:  # a model whose layers are not counted: no depth to check an adapter's base against
        meta["depth"] = None
    meta["trained"] = provenance(
        run.record,
        examples=examples,
        labels=data.labels,
        precision=run.accelerator.mixed_precision,
        device_type=run.accelerator.device.type,
        processes=run.accelerator.num_processes,
        base_model=meta["base_model"],
    )
    cal = data.windows.calibration_features  # SQuAD v2 training data: the threshold's questions
    return Evaluator(
        accelerator=run.accelerator,
        loader=windows(data.windows.eval_features),
        examples=examples.eval,
        recorder=run.recorder,
        tokenizer=tokenizer,
        meta=meta,
        best_model=run.output_dir / "best_model" if c.save_model else None,
        calibration=None if cal is None else (windows(cal), examples.calibration),
        signals=signals,
        fixed_threshold=DEFAULT_NO_ANSWER_THRESHOLD if examples.v2 and examples.calibration_off is not None else None,
        batch_size=c.eval_batch_size,
        pad_to_multiple_of=c.pad_to_multiple_of,
        trained_on=len(examples.train),
    )


def check_hooks(hooks: Sequence[Any]) -> None:
    """Refuse what is not a hook before anything is written: a class where an instance was meant, a function that
    belongs in `callbacks=`."""
    for i, hook in enumerate(hooks):
        if isinstance(hook, Hook):
            continue
        if isinstance(hook, type) and issubclass(hook, Hook):
            raise TypeError(f"hooks[{i}] is the class {hook.__name__}: pass an instance, {hook.__name__}()")
        hint = "; a function of each Update goes in callbacks=" if callable(hook) else ""
        raise TypeError(f"hooks[{i}] is {type(hook).__name__}, not a bertqa.engine.Hook{hint}")


def finish(run: Run) -> None:
    """End the run's use of its processes (`runtime.end_processes`), its prepared model let go first."""
    run.model = run.one_pass = None  # the DistributedDataParallel wrapper of a launched run, and what holds it
    runtime.end_processes(run.accelerator)


def interrupted(run: Run, stop: Interrupted) -> Interrupted:
    """A run stopped by a signal: a checkpoint of the update it finished, a line in metrics.jsonl, the curves so
    far; the `Interrupted` to raise names the checkpoint. A second signal (`stop.at_once`) is raised as it is: the
    checkpoints saved before are what is left."""
    if stop.at_once:
        return stop
    state = run.state
    folder = run.write_checkpoint()
    reason = f"interrupted by {signal_name(stop.signum)}"
    run.recorder.log_stop(step=state.step, epoch=state.epoch, reason=reason, key="interrupted")
    run.recorder.finish(title=f"bertqa: {run.record['model']}")
    finish(run)
    return Interrupted(stop.signum, step=state.step, total_steps=run.total_steps, checkpoint=folder)
