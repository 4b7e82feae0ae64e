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
from bertqa.postprocess import (
    MAX_CALIBRATION_ERROR,
    NO_ANSWER_SCALES,
    NO_CALIBRATION,
    TEMPERATURES,
    Prediction,
    confidence,
    fit_calibration,
    question_report,
)
from bertqa.training import checkpoint
from bertqa.training.runtime import peak_memory

if TYPE_CHECKING:
    from accelerate import Accelerator

    from bertqa.training.interrupt import SignalCatcher
    from bertqa.training.reporting import RunRecorder
    from bertqa.training.state import TrainState

__all__ = ["LONG_EVALUATION_WINDOWS", "Evaluator"]

logger = logging.getLogger("bertqa")

# An evaluation over this many windows (the evaluation data's and the threshold's) is timed and announced before the
# first one: about a minute on a laptop CPU.
LONG_EVALUATION_WINDOWS = 2000
# An evaluation of this many times the training questions is said to be lopsided (a held-out share of a large file
# with few questions trained on, say).
LOPSIDED = 4


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
    batch_size: int = 64  # windows per evaluation batch, and the multiple they are padded to: for the estimate
    pad_to_multiple_of: int = 8
    trained_on: int = 0  # training questions, to compare a long evaluation with
    last: dict[str, Any] = field(default_factory=dict)  # the latest record
    seconds: float = 0.0  # how long the latest evaluation took
    planned: bool = False  # the plan line was said (before the first evaluation)

    @property
    def loaders(self) -> list[torch.utils.data.DataLoader]:
        """Every loader an evaluation runs over: the evaluation data's and the threshold's."""
        return [self.loader] + ([self.calibration[0]] if self.calibration else [])

    def __call__(self, model: torch.nn.Module, state: TrainState, **train_stats: float) -> dict[str, Any]:
        if not self.planned:
            self.say_plan(model)
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
        memory = peak_memory(self.accelerator)  # training's peak so far (an evaluation holds far less)
        record = {"step": state.step, "epoch": state.epoch, **train_stats, **metrics, **calibrated, **memory}
        record["train_time_s"] = state.train_time_s  # of the updates so far, over every resume
        self.recorder.log_eval(record)
        # The untrained model of an evaluation before training is a baseline, never kept as the best model.
        if self.best_model is not None and state.step > 0 and metrics["f1"] > state.best_model_f1:
            self.save_model(model, self.best_model, record)
            state.best_model_f1 = metrics["f1"]
        state.best_f1 = max(state.best_f1, metrics["f1"])
        self.last, self.seconds = record, time.perf_counter() - t0
        return record

    def say_plan(self, model: torch.nn.Module) -> None:
        """Before the first evaluation of a long one (`LONG_EVALUATION_WINDOWS`): how many questions it scores, and
        about how long it takes (timed on three batches of each loader); a warning when it scores far more
        questions than the run trains on."""
        self.planned = True
        windows = sum(len(loader.dataset) for loader in self.loaders)
        if windows < LONG_EVALUATION_WINDOWS:
            return
        from bertqa.config import format_duration
        from bertqa.training.timing import evaluation_seconds

        seconds = evaluation_seconds(
            model,
            self.loaders,
            device=self.accelerator.device,
            batch_size=self.batch_size,
            multiple=self.pad_to_multiple_of,
        )
        threshold = f" and {len(self.calibration[1]):,} for the no-answer threshold" if self.calibration else ""
        logger.info(
            "each evaluation scores %s questions%s (%s windows): about %s each, timed on a few batches",
            f"{len(self.examples):,}",
            threshold,
            f"{windows:,}",
            format_duration(seconds / self.accelerator.num_processes),
        )
        if self.trained_on and len(self.examples) > LOPSIDED * self.trained_on:
            logger.warning(
                "the evaluation scores %s questions, %.0f times the %s the run trains on: --max-eval-examples "
                "scores a seeded draw of fewer",
                f"{len(self.examples):,}",
                len(self.examples) / self.trained_on,
                f"{self.trained_on:,}",
            )

    def _threshold(self, model: torch.nn.Module) -> dict[str, float]:
        """The no-answer threshold to evaluate with, chosen on held-out training questions when there are some."""
        if self.calibration is None:
            return {} if self.fixed_threshold is None else {"no_answer_threshold": self.fixed_threshold}
        loader, examples = self.calibration
        cal, predictions = evaluate(
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
        calibration = self._calibration(examples, predictions, threshold=cal["best_f1_thresh"])
        return {"no_answer_threshold": cal["best_f1_thresh"], "calibration_best_f1": cal["best_f1"], **calibration}

    def _calibration(
        self, examples: Sequence[Example], predictions: dict[str, Prediction], *, threshold: float
    ) -> dict[str, float]:
        """How the model's probabilities are given, chosen on the threshold's held-out questions: as they are where
        they already mean what they say there (expected calibration error at most `MAX_CALIBRATION_ERROR`, the
        worse of `probability` and `no_answer_probability`), else with the `Calibration` fitted there. With the
        error before and after; worked out on the main process (which has the predictions) and shared."""
        from accelerate.utils import broadcast_object_list

        found: list[dict[str, float]] = [{}]
        if self.accelerator.is_main_process:
            rows = question_report(examples, predictions, v2=True, threshold=threshold)
            before = _worst_error(rows)
            fitted = NO_CALIBRATION if before <= MAX_CALIBRATION_ERROR else fit_calibration(rows, predictions)
            after = before  # as given: the same report
            if fitted != NO_CALIBRATION:
                after = _worst_error(
                    question_report(examples, predictions, v2=True, threshold=threshold, calibration=fitted)
                )
            found = [{**fitted.to_settings(), "calibration_ece": before, "calibrated_ece": after}]
            logger.info("%s", _describe_calibration(found[0], len(rows)))
        return broadcast_object_list(found)[0]

    def save_model(self, model: torch.nn.Module, path: Path, record: dict[str, Any]) -> None:
        checkpoint.save_model(self.accelerator, model, self.tokenizer, path, {**self.meta, "eval": record})


def _worst_error(rows: list[dict[str, object]]) -> float:
    """The larger expected calibration error of a report's two probabilities."""
    return max(float(c["ece"]) for c in confidence(rows).values())


def _describe_calibration(found: dict[str, float], questions: int) -> str:
    ece = found["calibration_ece"]
    before = f"probabilities: expected calibration error {ece:.3f} on the {questions:,} threshold questions"
    if ece <= MAX_CALIBRATION_ERROR:
        return f"{before} (at most {MAX_CALIBRATION_ERROR}): given as they are"
    line = (
        f"{before}; recalibrated there (temperature {found['temperature']:.2f}, no-answer log-odds x "
        f"{found['no_answer_scale']:.2f} {found['no_answer_shift']:+.1f}; saved with the model, used wherever it "
        f"answers, no answer changes) it is {found['calibrated_ece']:.3f}"
    )
    edges = [
        name
        for name, grid in (("temperature", TEMPERATURES), ("no_answer_scale", NO_ANSWER_SCALES))
        if found[name] in (grid[0], grid[-1])
    ]
    if edges:
        line += f" ({' and '.join(edges)} at the edge of those tried: the scores say little about what comes true)"
    if found["calibrated_ece"] > MAX_CALIBRATION_ERROR:
        line += f", still above {MAX_CALIBRATION_ERROR}"
    return line
