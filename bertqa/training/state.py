"""Where a training loop stands and how it ends: `TrainState` (saved in every checkpoint), the `Update` hooks see,
`LogMeter` (the loss and throughput between log points), and the ways a run ends early: `StopTraining` (a decision),
`Interrupted` (a signal), `NonFiniteLossError` (a diverged loss). `notify` calls observers and keeps a stop.

`bertqa.engine` re-exports them; they live here, importing nothing of bertqa, so a loop of your own,
`bertqa.batching` and every hook can use them without the engine.
"""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

__all__ = ["Interrupted", "LogMeter", "NonFiniteLossError", "StopTraining", "TrainState", "Update", "notify"]

logger = logging.getLogger("bertqa")


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite."""


class StopTraining(Exception):
    """Raise it from a hook (`bertqa.training.hooks.Hook`), an update callback or an evaluation observer to end the
    run after the current update (not from a loss: that is mid-update, and it propagates like any other error).

    `fit` then evaluates, checkpoints and saves the final model as at a normal end, and its summary says why
    (`stopped_early`). The reason is kept in `TrainState`, which every checkpoint saves, so a resumed run that was
    stopped stays stopped. With several processes every process must decide alike: they see the same updates and
    the same evaluation records (`Update.loss` is this process's own; reduce it before deciding on it).
    """


@dataclass
class Update:
    """What hooks and callbacks see after each optimizer update. `loss` (this process's mean over the update's
    micro-batches) and `grad_norm` (the gradients' total norm before clipping, as clipping returned it; None when
    `max_grad_norm` is 0) stay on the device: reading one is a sync point."""

    step: int
    epoch: int
    lr: float
    loss: torch.Tensor
    grad_norm: torch.Tensor | None = None


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
    # A time-budget run's plan (`bertqa.training.budget.BudgetPlan.to_dict()`, kept so a resumed run does not
    # measure again) and the seconds of the budget spent so far
    budget_plan: dict[str, Any] | None = None
    budget_used_s: float = 0.0
    # The update the run ends at, when a callback moved it from where the loop was told (a time budget's run that
    # fell behind its plan or ran ahead of it); `train_one_epoch` stops there
    end_step: int | None = None
    # Seconds spent training (updates, not evaluations or checkpoints), over every resume of the run
    train_time_s: float = 0.0
    # The hooks' own states (`Hook.state_dict()`, by hook), read just before each checkpoint is written
    hooks: dict[str, Any] = field(default_factory=dict)

    def state_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

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


class LogMeter:
    """Training loss and throughput between two log points, summed on the device so no update waits for the host.

    Like torchvision's MetricLogger, but `read` is the only place a value leaves the device (`.item()` syncs).
    """

    def __init__(self, device: Any) -> None:
        import torch

        self.loss = torch.zeros((), device=device)
        self.pass_loss, self.pass_updates = 0.0, 0  # over every read so far: the mean loss of the pass
        self.reset()

    def reset(self) -> None:
        self.loss.zero_()
        self.updates, self.windows, self.tokens, self.t0 = 0, 0, 0, time.perf_counter()

    def add_batch(self, batch: Mapping[str, Any]) -> None:
        self.windows += batch["input_ids"].shape[0]
        self.tokens += batch["attention_mask"].sum()

    def add_update(self, loss: Any) -> None:
        self.loss += loss
        self.updates += 1

    def read(
        self, *, step: int, epoch: int, lr: float, num_processes: int, reduce: Callable[[Any], Any] | None = None
    ) -> dict[str, Any]:
        """The log record since the last read, then start a new interval. `reduce` (every process calls `read` at the
        same update) averages the loss over the processes, so each logs the same value: the run's, not its own."""
        loss = (self.loss if reduce is None else reduce(self.loss)).item() / self.updates
        elapsed = time.perf_counter() - self.t0
        record = {
            "step": step,
            "epoch": epoch,
            "loss": loss,
            "lr": lr,
            "windows_per_s": self.windows * num_processes / elapsed,
            "tokens_per_s": float(self.tokens) * num_processes / elapsed,
        }
        self.pass_loss, self.pass_updates = self.pass_loss + loss * self.updates, self.pass_updates + self.updates
        self.reset()
        return record

    def pass_mean(self) -> float:
        return self.pass_loss / self.pass_updates if self.pass_updates else float("nan")


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class Interrupted(KeyboardInterrupt):
    """A run stopped by a signal. Raised by `fit` after it saved a checkpoint of the update it had finished
    (`checkpoint`), or with `checkpoint=None` when nothing new was there to save (the signal came before training,
    or a second signal stopped it at once).

    A KeyboardInterrupt, so a script or notebook that does not catch it stops as it would at Ctrl-C, and a broad
    `except Exception` does not swallow it. `exit_code` is the shell's convention: 128 + the signal's number.
    """

    def __init__(
        self,
        signum: int,
        *,
        step: int | None = None,
        total_steps: int | None = None,
        checkpoint: Path | None = None,
        at_once: bool = False,
        resume_hint: str = "run the same command with --resume latest to continue",
    ) -> None:
        self.signum, self.step, self.total_steps, self.checkpoint = signum, step, total_steps, checkpoint
        self.at_once = at_once  # a second signal: stopped where it was, without saving
        self.resume_hint = resume_hint
        super().__init__(self.describe())

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    def describe(self) -> str:
        name = signal_name(self.signum)
        if self.checkpoint is not None:
            return (
                f"interrupted by {name} at update {self.step} of {self.total_steps}; saved {self.checkpoint}; "
                f"{self.resume_hint}"
            )
        if self.at_once:
            return (
                f"stopped at once by a second {name}; nothing new was saved, and any checkpoint saved before is intact"
            )
        return f"stopped by {name} before training began; nothing was saved"
