"""Where a training loop stands and how it ends: `TrainState` (saved in every checkpoint), the `Update` callbacks
see, `StopTraining` (the one stop signal), `notify` (calls observers, keeps a stop) and `EarlyStopping`.

`bertqa.engine` re-exports all of them; they live here so a loop of your own, and `bertqa.batching`, can use them
without the engine.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["EarlyStopping", "StopTraining", "TrainState", "Update", "count_evaluations", "notify"]

logger = logging.getLogger("bertqa")


class StopTraining(Exception):
    """Raise it from an update callback or an evaluation observer to end the run after the current update (not from
    a loss: that is mid-update, and it propagates like any other error).

    `fit` then evaluates, checkpoints and saves the final model as at a normal end, and its summary says why
    (`stopped_early`). The reason is kept in `TrainState`, which every checkpoint saves, so a resumed run that was
    stopped stays stopped. With several processes every process must decide alike: they see the same updates and
    the same evaluation records (`Update.loss` is this process's own; reduce it before deciding on it).
    """


@dataclass
class Update:
    """What callbacks see after each optimizer update. `loss` stays on the device: reading it is a sync point."""

    step: int
    epoch: int
    lr: float
    loss: torch.Tensor


@dataclass
class TrainState:
    """Loop position, saved in every checkpoint so a resumed run continues at the same micro-batch, with the same
    best score, stop and early-stopping count."""

    step: int = 0
    epoch: int = 0
    batches_done: int = 0  # micro-batches of `epoch` already consumed
    best_f1: float = -1.0  # of every evaluation, the untrained model's before training too
    best_model_f1: float = -1.0  # of the model kept as the best (trained models only)
    stop_reason: str | None = None  # set by `StopTraining`: the run ends after this update
    # `EarlyStopping`'s count: evaluations since the score last rose enough, and the score and step it must beat
    evals_without_gain: int = 0
    patience_best: float | None = None
    patience_best_step: int | None = None
    # A time-budget run's plan (`bertqa.training.budget.BudgetPlan.to_dict()`, kept so a resumed run does not measure again)
    # and the seconds of the budget spent so far
    budget_plan: dict[str, Any] | None = None
    budget_used_s: float = 0.0
    # The update the run ends at, when a callback moved it earlier than the loop was told (a time budget's run that
    # fell behind); `train_one_epoch` stops there
    end_step: int | None = None

    def state_dict(self) -> dict[str, Any]:
        return dict(vars(self))

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():  # a checkpoint from before a field existed keeps that field's default
            setattr(self, key, value)


def notify(observers: Iterable[Callable[[Any], None]], event: Any, state: TrainState) -> None:
    """Call every observer with `event`; a `StopTraining` from any of them is kept in `state` (the first reason
    wins) and the others are still called, so each one sees every event."""
    for observer in observers:
        try:
            observer(event)
        except StopTraining as stop:
            if state.stop_reason is None:  # without a message, name who stopped it (a partial by its function)
                name = getattr(observer, "__name__", None) or getattr(getattr(observer, "func", None), "__name__", "")
                state.stop_reason = str(stop) or f"StopTraining from {name or type(observer).__name__}"
                logger.info("stopping after update %d: %s", state.step, state.stop_reason)


@dataclass
class EarlyStopping:
    """An evaluation observer that ends the run after `patience` evaluations in a row without a gain of at least
    `min_delta` (and more than 0) in `metric` over the best value so far.

    Give it to `fit(on_evaluate=[...])` (what `early_stopping_patience` does), or call it with each evaluation
    record in a loop of your own. Its count lives in `state`, the run's `TrainState`, which every checkpoint saves:
    a resumed run goes on counting where its checkpoint was. `fit` keeps the best model by F1 in `best_model/`.
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
    from bertqa.training.budget import evaluations_between

    # the same points as a budget plans with, less the final evaluation (after the last update: it cannot stop it)
    return evaluations_between(0, total, per_epoch=per_epoch, eval_every=eval_every) - 1 + eval_first
