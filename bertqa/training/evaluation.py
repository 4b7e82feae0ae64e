"""The evaluation a training run makes: `Evaluator` scores the model on the evaluation data (a SQuAD v2 run
calibrates its no-answer threshold on held-out training questions first), records the result, and keeps the best
model by F1. `Run.evaluate` calls it and tells the hooks; it is the one evaluation path, before training, mid-epoch,
at epoch ends and at a stop."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from bertqa.data import Example
from bertqa.inference import evaluate
from bertqa.training import checkpoint

if TYPE_CHECKING:
    from accelerate import Accelerator

    from bertqa.training.interrupt import SignalCatcher
    from bertqa.training.reporting import RunRecorder
    from bertqa.training.state import TrainState

__all__ = ["Evaluator"]

logger = logging.getLogger("bertqa")


@dataclass
class Evaluator:
    """Evaluate, record, keep the best model. `calibration` (SQuAD v2 training data) is what the no-answer threshold
    is chosen on before each evaluation; without it a v2 run uses `fixed_threshold`."""

    accelerator: Accelerator
    loader: torch.utils.data.DataLoader
    examples: Sequence[Example]
    recorder: RunRecorder
    tokenizer: Any
    meta: dict[str, Any]  # written to bertqa.json beside a saved model
    best_model: Path | None  # where the best model by F1 is kept (None: not saved)
    calibration: tuple[torch.utils.data.DataLoader, Sequence[Example]] | None
    signals: SignalCatcher  # a one-process evaluation stops at once at a signal
    fixed_threshold: float | None = None
    last: dict[str, Any] = field(default_factory=dict)  # the latest record
    seconds: float = 0.0  # how long the latest evaluation took

    @property
    def loaders(self) -> list[torch.utils.data.DataLoader]:
        """Every loader an evaluation runs over: the evaluation data's and the threshold's."""
        return [self.loader] + ([self.calibration[0]] if self.calibration else [])

    def __call__(self, model: torch.nn.Module, state: TrainState, **train_stats: float) -> dict[str, Any]:
        t0 = time.perf_counter()
        # One process may drop an evaluation at a signal (the checkpoint does not need it); several finish it
        # together, since a process that left it would keep the others waiting for its share.
        with self.signals.immediately(self.accelerator.num_processes == 1):
            calibrated = self._threshold(model)
            metrics, _ = evaluate(
                self.accelerator,
                model,
                self.loader,
                self.examples,
                v2=self.meta["v2"],
                max_answer_length=self.meta["max_answer_length"],
                threshold=calibrated.get("no_answer_threshold", 0.0),
                progress=True,
            )
        record = {"step": state.step, "epoch": state.epoch, **train_stats, **metrics, **calibrated}
        self.recorder.log_eval(record)
        # The untrained model of an evaluation before training is a baseline, never kept as the best model.
        if self.best_model is not None and state.step > 0 and metrics["f1"] > state.best_model_f1:
            self.save_model(model, self.best_model, record)
            state.best_model_f1 = metrics["f1"]
        state.best_f1 = max(state.best_f1, metrics["f1"])
        self.last, self.seconds = record, time.perf_counter() - t0
        return record

    def _threshold(self, model: torch.nn.Module) -> dict[str, float]:
        """The no-answer threshold to evaluate with, chosen on held-out training questions when there are some."""
        if self.calibration is None:
            return {} if self.fixed_threshold is None else {"no_answer_threshold": self.fixed_threshold}
        loader, examples = self.calibration
        cal, _ = evaluate(
            self.accelerator,
            model,
            loader,
            examples,
            v2=True,
            max_answer_length=self.meta["max_answer_length"],
            progress="threshold",
        )
        logger.info(
            "no-answer threshold %.3g, chosen on %d held-out questions: there it answers %d of %d answerable and %d of "
            "%d unanswerable ones (F1 %.2f)",
            cal["best_f1_thresh"],
            cal["total"],
            cal["best_f1_HasAns_answered"],
            cal.get("HasAns_total", 0),
            cal["best_f1_NoAns_answered"],
            cal.get("NoAns_total", 0),
            cal["best_f1"],
        )
        return {"no_answer_threshold": cal["best_f1_thresh"], "calibration_best_f1": cal["best_f1"]}

    def save_model(self, model: torch.nn.Module, path: Path, record: dict[str, Any]) -> None:
        checkpoint.save_model(self.accelerator, model, self.tokenizer, path, {**self.meta, "eval": record})
