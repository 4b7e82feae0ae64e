"""Everything that runs beside the training loop, through one protocol: a `Hook` is told what happened and decides
for itself whether to act.

The events, in the order a run meets them:

    on_resume(run, checkpoint)  a checkpoint was loaded (resumed runs only), before anything is planned or logged
    on_start(run)               the run is about to train (after a resume, before the first update)
    on_update(run, update)      after each optimizer update (`Update`: step, epoch, lr, loss, grad_norm)
    on_evaluate(run, record)    after each evaluation (`record`: a line of metrics.jsonl)
    on_save(run, folder)        after each checkpoint
    on_pass_end(run, stats)     after each pass over the data (an epoch, or a pass cut short by a stop or the end)
    on_end(run, summary)        the run is over (`summary`: what `fit` returns, less the label report)

Every method does nothing by default. Any hook may end the run by raising `StopTraining` (from on_start, on_update,
on_evaluate or on_pass_end): the run then evaluates, checkpoints and saves its final model as at a normal end, and
a resumed run stays stopped. A hook with state returns it from `state_dict()`: it is saved in every checkpoint
(inside `TrainState`) and given back to `load_state_dict` when the run resumes.

bertqa's own features are hooks like yours, and a feature that is off is not in the list: `Periodic` (evaluations
and checkpoints on their schedule), `SaveFinalModel`, `Records` (the progress bar, the stop's record and the
curves), `EarlyStopping`, `bertqa.training.budget.TimeBudget` and `Signals` (Ctrl-C and SIGTERM). `Callbacks`
adapts plain functions (`fit(callbacks=..., on_evaluate=...)`). `fit` tells them in this order: Records,
SaveFinalModel, the callbacks and your hooks, EarlyStopping, Periodic, TimeBudget, Signals; so a checkpoint holds the
state your hooks had after the update it saves, and your `on_end` finds the final model written.
"""

from __future__ import annotations

import logging
import math
import pickle
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from bertqa.training.optim import evaluations_between
from bertqa.training.state import NonFiniteLossError, StopTraining, TrainState, Update, notify, signal_name

if TYPE_CHECKING:
    from accelerate import Accelerator

    from bertqa.batching import DataOrder
    from bertqa.training.evaluation import Evaluator
    from bertqa.training.interrupt import SignalCatcher
    from bertqa.training.reporting import RunRecorder

__all__ = [
    "Callbacks",
    "EarlyStopping",
    "Hook",
    "Hooks",
    "Periodic",
    "Records",
    "Run",
    "SaveFinalModel",
    "Signals",
    "count_evaluations",
]

logger = logging.getLogger("bertqa")


class Hook:
    """Something that runs beside the training loop. Override the events you need; see the module's docstring for
    when each comes. `run` is the `Run`: its pieces (model, optimizer, scheduler, state, ...) and what it can do
    (`run.evaluate()`, `run.save()`). With several processes every process's hooks see the same events; a hook that
    decides to stop must decide alike on all of them (reduce a process's own numbers first)."""

    def on_resume(self, run: Run, checkpoint: Path) -> None:
        pass

    def on_start(self, run: Run) -> None:
        pass

    def on_update(self, run: Run, update: Update) -> None:
        pass

    def on_evaluate(self, run: Run, record: Mapping[str, Any]) -> None:
        pass

    def on_save(self, run: Run, folder: Path) -> None:
        pass

    def on_pass_end(self, run: Run, stats: Mapping[str, float]) -> None:
        pass

    def on_end(self, run: Run, summary: Mapping[str, Any]) -> None:
        pass

    def state_dict(self) -> dict[str, Any] | None:
        """What this hook needs back on resume (picklable), read as each checkpoint is written; None: nothing."""
        return None

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take back what `state_dict` returned, from the checkpoint a run resumes from."""


class Hooks:
    """The run's hooks, told each event in their order. A `StopTraining` from one is kept in the run's state (the
    first reason wins) and the others are still told, so each sees every event."""

    def __init__(self, hooks: Iterable[Hook] = ()) -> None:
        self.hooks = list(hooks)

    def __iter__(self) -> Iterator[Hook]:
        return iter(self.hooks)

    def _tell(self, state: TrainState, event: str, *args: Any) -> None:
        for hook in self.hooks:
            try:
                getattr(hook, event)(*args)
            except StopTraining as stop:
                if event == "on_end":  # nothing is left to stop
                    logger.warning("StopTraining from %s.on_end is ignored: the run had ended", type(hook).__name__)
                elif state.stop_reason is None:
                    state.stop_reason = str(stop) or f"StopTraining from {type(hook).__name__}"
                    logger.info("stopping after update %d: %s", state.step, state.stop_reason)

    def resume(self, run: Run, checkpoint: Path) -> None:
        self._tell(run.state, "on_resume", run, checkpoint)

    def start(self, run: Run) -> None:
        self._tell(run.state, "on_start", run)

    def update(self, run: Run, update: Update) -> None:
        self._tell(run.state, "on_update", run, update)

    def evaluate(self, run: Run, record: Mapping[str, Any]) -> None:
        self._tell(run.state, "on_evaluate", run, record)

    def save(self, run: Run, folder: Path) -> None:
        self._tell(run.state, "on_save", run, folder)

    def pass_end(self, run: Run, stats: Mapping[str, float]) -> None:
        self._tell(run.state, "on_pass_end", run, stats)

    def end(self, run: Run, summary: Mapping[str, Any]) -> None:
        self._tell(run.state, "on_end", run, summary)

    def _keyed(self) -> list[tuple[str, Hook]]:
        """Each hook with the key its state is saved under: its class name, numbered from the second of a kind."""
        seen: dict[str, int] = {}
        keyed = []
        for hook in self.hooks:
            name = type(hook).__qualname__
            seen[name] = seen.get(name, 0) + 1
            keyed.append((name if seen[name] == 1 else f"{name}#{seen[name]}", hook))
        return keyed

    def state_dict(self) -> dict[str, Any]:
        """Each hook's state, checked to be picklable: a hook whose state cannot be saved is named before a
        checkpoint is attempted."""
        states = {}
        for key, hook in self._keyed():
            try:
                state = hook.state_dict()
                if state is not None:
                    pickle.dumps(state)
            except Exception as err:
                raise TypeError(
                    f"hook {key}: its state_dict() cannot be saved in a checkpoint ({type(err).__name__}: {err}); "
                    "return plain values (numbers, strings, lists, dicts, tensors, arrays)"
                ) from err
            if state is not None:
                states[key] = state
        return states

    def load_state_dict(self, states: Mapping[str, Any]) -> None:
        for key, hook in self._keyed():
            if key in states:
                hook.load_state_dict(states[key])


@dataclass
class Run:
    """A training run as its hooks see it: the prepared pieces, where it stands, and what it can do. `total_steps`,
    `per_epoch` and `warmup_steps` may change while it runs (a time budget plans them; a hook that lowers
    `total_steps` ends the run there, its LR schedule as it was)."""

    accelerator: Accelerator
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    order: DataOrder
    state: TrainState
    per_epoch: int
    total_steps: int
    warmup_steps: int
    hyperparameters: list[dict[str, float]]  # as built: what a resumed run's own settings put back
    output_dir: Path
    record: dict[str, Any]  # the settings that config.json and every checkpoint save
    one_pass: Callable[..., dict[str, float]]  # `train_one_epoch` bound to the run's pieces
    checkpoint: Callable[[int], Path]  # writes a checkpoint of the given update and returns its folder
    hooks: Hooks = field(default_factory=Hooks)
    recorder: RunRecorder = field(init=False, repr=False)  # set when the run begins (`setup.begin`)
    evaluator: Evaluator = field(init=False, repr=False)
    timing: bool = False  # a time budget's warm-up is being timed: nothing else is to run between its updates
    finished: bool = False  # the loop is over: what follows is the end of the run
    train_time_s: float = 0.0
    tick: float = 0.0  # when the update in progress began: its time is added to `TrainState.train_time_s`
    saved: tuple[int, str | None] | None = None  # (update, stop) the latest checkpoint holds
    saved_folder: Path | None = None  # and where it is
    pass_end: int = 0  # the update the pass in progress was told to end at

    @property
    def end(self) -> int:
        """The update the run ends at: `total_steps`, or sooner where the run was shortened (`TrainState.end_step`)."""
        return self.total_steps if self.state.end_step is None else min(self.total_steps, self.state.end_step)

    def train_pass(self, batches: Iterable[Any] | None = None, *, max_steps: int | None = None) -> dict[str, float]:
        """One pass of `train_one_epoch` from where the run stands (to `max_steps`, default the run's end), its
        updates told to the hooks and its log points recorded."""
        batches = self.order.batches(self.accelerator, self.state) if batches is None else batches
        self.pass_end = max_steps or self.total_steps
        self.tick = time.perf_counter()
        stats = self.one_pass(
            batches, max_steps=self.pass_end, callbacks=[self._updated], on_log=self.recorder.log_train
        )
        self.train_time_s += stats["train_time_s"]
        return stats

    def _updated(self, update: Update) -> None:
        self.state.train_time_s += time.perf_counter() - self.tick  # the update alone: not what the hooks do next
        self.hooks.update(self, update)
        self.tick = time.perf_counter()
        if self.total_steps < self.pass_end:  # a hook shortened the run: this pass (and the run) ends there
            self.state.end_step = self.pass_end = self.total_steps

    def evaluate(self, **train_stats: float) -> dict[str, Any]:
        """Evaluate now (the v2 threshold calibrated first), record it, keep the best model; tell the hooks."""
        record = self.evaluator(self.model, self.state, **train_stats)
        self.hooks.evaluate(self, record)
        return record

    def save(self) -> Path | None:
        """Write a checkpoint of the update the run is at (with the hooks' states) and tell the hooks; None when the
        latest checkpoint already holds this update and its stop."""
        if self.saved == (self.state.step, self.state.stop_reason):
            return None
        folder = self.write_checkpoint()
        self.hooks.save(self, folder)
        return folder

    def write_checkpoint(self) -> Path:
        """The checkpoint itself, the hooks not told (a run stopping at a signal): the latest one when it holds this
        update and stop already; one of the same update is replaced when the run's stop changed since."""
        if self.saved == (self.state.step, self.state.stop_reason) and self.saved_folder is not None:
            return self.saved_folder
        self.state.hooks = self.hooks.state_dict()
        replace = self.saved is not None and self.saved[0] == self.state.step
        folder = self.checkpoint(self.state.step, replace=replace)
        self.saved, self.saved_folder = (self.state.step, self.state.stop_reason), folder
        return folder

    def final_evaluation(self) -> dict[str, Any]:
        """The evaluation at the update the run ends at: the latest, the one on record (a run resumed after its
        final checkpoint), or one made now."""
        last = self.evaluator.last
        if last.get("step") == self.state.step:
            return last
        return self.recorder.eval_record_at(self.state.step) or self.evaluate()


# --------------------------------------------------------------------------------------------------- built-in hooks


class Callbacks(Hook):
    """Plain functions as a hook: `on_update` ones get each `Update`, `on_evaluate` ones each evaluation record.
    A function that raises `StopTraining` ends the run; the others are still called."""

    def __init__(self, on_update: Sequence[Callable[[Update], None]] = (), on_evaluate: Sequence[Callable] = ()):
        self.update_callbacks, self.eval_callbacks = list(on_update), list(on_evaluate)

    def on_update(self, run: Run, update: Update) -> None:
        notify(self.update_callbacks, update, run.state)

    def on_evaluate(self, run: Run, record: Mapping[str, Any]) -> None:
        notify(self.eval_callbacks, record, run.state)


class Periodic(Hook):
    """Evaluations and checkpoints on their schedule: an evaluation before training (`eval_first`), every
    `eval_every` and `save_every` updates, and both at the end of each pass.

    An update that ends a pass or the run is left to the end-of-pass evaluation, which records the pass's training
    loss beside it; a time budget's timed warm-up is not interrupted (those updates are what it measures). It comes
    after the hooks that keep state, so a checkpoint holds their states as of the update it saves."""

    def __init__(self, *, eval_every: int | None, save_every: int | None, eval_first: bool) -> None:
        self.eval_every, self.save_every, self.eval_first = eval_every, save_every, eval_first

    def on_start(self, run: Run) -> None:
        state = run.state
        if self.eval_first and state.step == 0 and state.stop_reason is None:
            run.evaluate()
        # Resumed at an epoch end whose evaluation a signal dropped (only one process drops one, so only its records
        # are read here): that evaluation comes first.
        at_epoch_end = state.batches_done == 0 and 0 < state.step < run.end and state.stop_reason is None
        if at_epoch_end and run.accelerator.num_processes == 1 and run.recorder.eval_record_at(state.step) is None:
            run.evaluate()

    def on_update(self, run: Run, update: Update) -> None:
        if run.timing:
            return
        ends_pass = run.state.batches_done >= len(run.order) or update.step >= run.end
        if self.eval_every and update.step % self.eval_every == 0 and not ends_pass:
            run.evaluate()
            run.model.train()
        if self.save_every and update.step % self.save_every == 0:
            if not torch.isfinite(update.loss):  # never let a NaN step overwrite good checkpoints
                raise NonFiniteLossError(f"training loss is {update.loss.item()} at step {update.step}")
            run.save()

    def on_pass_end(self, run: Run, stats: Mapping[str, float]) -> None:
        if run.evaluator.last.get("step") != run.state.step:  # a stop may have come from an evaluation here
            run.evaluate(**({"train_loss": stats["train_loss"]} if stats["updates"] else {}))
        run.save()


class SaveFinalModel(Hook):
    """The model as the run ends, with its final evaluation, in `folder` (a `save_pretrained` folder)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def on_end(self, run: Run, summary: Mapping[str, Any]) -> None:
        run.evaluator.save_model(run.model, self.folder, summary["final"])


class Records(Hook):
    """The run's records as it goes: the progress bar, what a resumed run has left, why it stopped (a line of
    metrics.jsonl), and the curves (training_curves.png) at the end."""

    def __init__(self, *, title: str) -> None:
        self.title = title

    def on_start(self, run: Run) -> None:
        state = run.state
        if state.stop_reason is not None:
            logger.info(
                "this run was stopped at update %d (%s): nothing is left to train", state.step, state.stop_reason
            )
        elif 0 < run.end <= state.step:
            logger.info("this run had done all its %d updates: nothing is left to train", run.end)

    def on_update(self, run: Run, update: Update) -> None:
        run.recorder.bar.update(1)

    def on_end(self, run: Run, summary: Mapping[str, Any]) -> None:
        if run.state.stop_reason is not None:
            run.recorder.log_stop(step=run.state.step, epoch=run.state.epoch, reason=run.state.stop_reason)
        run.recorder.finish(title=self.title)


class Signals(Hook):
    """Ctrl-C and SIGTERM (caught by `signals`) stop the run at the next safe point: after an update (agreed across
    processes every few), an evaluation or a checkpoint, by raising `Interrupted`; the run then saves the update it
    finished (`stop`)."""

    def __init__(self, signals: SignalCatcher) -> None:
        self.signals = signals

    def on_update(self, run: Run, update: Update) -> None:
        self.signals.check(run.accelerator, update)

    def on_evaluate(self, run: Run, record: Mapping[str, Any]) -> None:
        self.signals.check(run.accelerator)

    def on_save(self, run: Run, folder: Path) -> None:
        if not run.finished:  # one that came during a save: stop here, not an update later
            self.signals.check(run.accelerator)

    def on_end(self, run: Run, summary: Mapping[str, Any]) -> None:
        if self.signals.received is not None:  # it came while the run was ending: nothing was left to stop
            logger.info(
                "the run had finished its updates when %s came: it is complete", signal_name(self.signals.received)
            )


@dataclass
class EarlyStopping(Hook):
    """Ends the run after `patience` evaluations in a row without a gain of at least `min_delta` (and more than 0)
    in `metric` over the best value so far.

    A hook (`fit(hooks=[...])`; `early_stopping_patience` adds one), or call it with each evaluation record in a
    loop of your own. Its count lives in `state`, the run's `TrainState`, which every checkpoint saves: a resumed
    run goes on counting where its checkpoint was. `fit` keeps the best model by F1 in `best_model/`.
    """

    state: TrainState
    patience: int
    min_delta: float = 0.0
    metric: str = "f1"

    def __post_init__(self) -> None:
        if self.patience < 1:
            raise ValueError(f"early stopping patience must be at least 1 evaluation, got {self.patience}")
        if not self.min_delta >= 0:  # `not`: NaN is refused too
            raise ValueError(f"early stopping min_delta must be >= 0, got {self.min_delta}")

    @classmethod
    def for_run(cls, state: TrainState, *, patience: int, min_delta: float, evaluations: int) -> EarlyStopping:
        """Early stopping for a run that evaluates `evaluations` times before its last update (`count_evaluations`),
        refused when the patience can never be used up."""
        if evaluations < patience + 1:  # one evaluation sets the best F1, `patience` more without a gain end the run
            raise ValueError(
                f"early_stopping_patience={patience} can never end this run: it evaluates {evaluations} time"
                f"{'' if evaluations == 1 else 's'} before its last update and needs {patience + 1}; evaluate more "
                f"often (eval_every_steps) or train longer{', or lower the patience' if patience > 1 else ''}"
            )
        return cls(state, patience=patience, min_delta=min_delta)

    def on_evaluate(self, run: Run, record: Mapping[str, Any]) -> None:
        if run.state.step < run.end:  # the evaluation after the last update has nothing left to stop
            self(record)

    def __call__(self, record: Mapping[str, Any]) -> None:
        if self.metric not in record:
            raise KeyError(f"early stopping watches {self.metric!r}, which this evaluation record lacks")
        value, s = float(record[self.metric]), self.state
        best = s.patience_best
        gained = math.isfinite(value) and (best is None or (value > best and value - best >= self.min_delta))
        if gained:
            s.patience_best, s.patience_best_step, s.evals_without_gain = value, record.get("step"), 0
            return
        s.evals_without_gain += 1
        if s.evals_without_gain >= self.patience:
            gain = f"a gain of at least {self.min_delta:g}" if self.min_delta else "any gain"
            over = f" over the best {best:.2f} (step {s.patience_best_step})" if best is not None else ""
            raise StopTraining(
                f"early stopping: {self.metric} {value:.2f} at step {record.get('step')}, {s.evals_without_gain} "
                f"evaluation{'s in a row' if s.evals_without_gain > 1 else ''} without {gain}{over}"
            )


def count_evaluations(*, total: int, per_epoch: int, eval_every: int | None, eval_first: bool) -> int:
    """How many evaluations a run of `total` updates makes before its last update (the ones that can end it early):
    one at each epoch end, every `eval_every` updates, and one before training if `eval_first`."""
    # the same points as a budget plans with, less the final evaluation (after the last update: it cannot stop it)
    return evaluations_between(0, total, per_epoch=per_epoch, eval_every=eval_every) - 1 + eval_first
