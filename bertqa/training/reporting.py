"""Run records a person can read: the run folder's JSON-lines logs, the progress bar, and a PNG of the curves.

`RunRecorder` owns what a training run writes about itself (config.json, train_log.jsonl, metrics.jsonl, the
trackers, the progress bar); the engine tells it what happened and never touches those files itself.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from bertqa.config import format_duration
from bertqa.examples import LoadReport, is_v2
from bertqa.inference import progress_bars

__all__ = [
    "MainProcessOnly",
    "RunRecorder",
    "append_jsonl",
    "check_writable",
    "console_handler",
    "console_logging",
    "dumps",
    "format_metrics",
    "jsonable",
    "log_plan",
    "plot_curves",
    "plot_reliability",
    "process_rank",
    "read_json",
    "read_jsonl",
    "truncate_jsonl",
]

logger = logging.getLogger("bertqa")
# Without a progress bar (stderr is a file), a line saying where training stands at most this often.
PROGRESS_EVERY_S = 30.0
TrackerLog = Callable[..., None]  # Accelerator.log(values, step=...)


def process_rank() -> int:
    """This process's rank among a launched run's processes (0 when there is one): set by the launcher."""
    return int(os.environ.get("RANK", "0") or 0)


class MainProcessOnly(logging.Filter):
    """Lets through what the main process logs, and errors from any: every process of a run logs the same lines,
    which would otherwise be printed once per process."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR or process_rank() == 0


class _AboveTheBars(logging.StreamHandler):
    """Log lines written through tqdm, so they land above a progress bar instead of on its line."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm.auto import tqdm

        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # logging must never take the run down
            self.handleError(record)


def console_handler() -> logging.Handler:
    """The handler bertqa's lines are shown with: timestamped, on stderr above the progress bars, from the main
    process only."""
    handler = _AboveTheBars()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S"))
    handler.addFilter(MainProcessOnly())
    return handler


@contextlib.contextmanager
def console_logging() -> Iterator[None]:
    """Show bertqa's INFO lines (what a run loads, plans and scores) for the duration, when nobody configured
    logging: a library user calling `fit` sees what the scripts show (transformers' own reports and bars are quiet
    meanwhile, as in the scripts). Logging set up by the user (a handler on the root or the "bertqa" logger, or a
    level set on it) is left as it is."""
    if logger.handlers or logging.getLogger().handlers or logger.level != logging.NOTSET:
        yield
        return
    from transformers.utils import logging as hf_logging

    handler = console_handler()
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    # As the scripts do: transformers' load reports and per-file save bars would bury bertqa's lines.
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(logging.NOTSET)
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


class RunRecorder:
    """The records of one training run in `output_dir`. Only the main process writes files and draws the bar;
    every process calls the same methods, and `tracker_log` (Accelerator.log) decides for itself who logs."""

    def __init__(
        self, output_dir: str | Path, *, is_main: bool, total_steps: int, step: int, tracker_log: TrackerLog
    ) -> None:
        from tqdm.auto import tqdm

        self.out = Path(output_dir)
        self.train_log, self.eval_log = self.out / "train_log.jsonl", self.out / "metrics.jsonl"
        self.is_main = is_main
        self.tracker_log = tracker_log
        # A bar on a terminal; in a file, a plain line at most every PROGRESS_EVERY_S seconds (`log_train`).
        shown = is_main and progress_bars()
        self.bar = tqdm(total=total_steps, initial=step, desc="train", unit="upd", disable=not shown)
        self.total_steps, self.first_step, self.t0, self.said_at = total_steps, step, time.perf_counter(), 0.0

    def start(self, config: Mapping[str, Any], *, resumed_at: int | None, initial_lr: float | None = None) -> None:
        """Save the config; a resumed run drops log records past its checkpoint (those steps are run again), a new
        one starts its log with the learning rate at step 0, so the curves show the warmup from its start."""
        if not self.is_main:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "config.json").write_text(dumps(dict(config), indent=2) + "\n")
        for log in (self.train_log, self.eval_log):
            truncate_jsonl(log, resumed_at) if resumed_at is not None else log.unlink(missing_ok=True)
        if resumed_at is None and initial_lr is not None:
            append_jsonl(self.train_log, {"step": 0, "epoch": 0, "lr": initial_lr})

    def replan(self, config: Mapping[str, Any], *, total_steps: int) -> None:
        """A run whose length was planned after it began (a time budget): the new length, and the config with the
        plan in it."""
        self.bar.total = self.total_steps = total_steps
        self.bar.refresh()
        if self.is_main:
            (self.out / "config.json").write_text(dumps(dict(config), indent=2) + "\n")

    def on_update(self, update: Any) -> None:
        """An update callback: advance the progress bar."""
        self.bar.update(1)

    def log_train(self, record: Mapping[str, Any]) -> None:
        """One training log point (loss, LR, throughput) to the bar, the trackers and train_log.jsonl."""
        self.bar.set_postfix(
            loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.2e}", win_s=f"{record['windows_per_s']:.1f}"
        )
        self.tracker_log({f"train/{k}": v for k, v in record.items() if k != "step"}, step=record["step"])
        if self.is_main:
            append_jsonl(self.train_log, record)
        now = time.perf_counter()
        last = record["step"] >= self.total_steps
        if self.bar.disable and (now - self.said_at >= PROGRESS_EVERY_S or last):
            self.said_at = now
            logger.info("%s", self._progress_line(record, now))

    def _progress_line(self, record: Mapping[str, Any], now: float) -> str:
        """Where training stands, for a log without a progress bar."""
        step, total = record["step"], self.total_steps
        rate = (step - self.first_step) / max(now - self.t0, 1e-9)
        left = f"; about {format_duration((total - step) / rate)} of training left" if rate > 0 and step < total else ""
        return (
            f"update {step} of {total} ({100 * step / max(total, 1):.0f}%): loss {record['loss']:.3f}, lr "
            f"{record['lr']:.2e}, {record['windows_per_s']:.1f} windows/s{left}"
        )

    def eval_record_at(self, step: int) -> dict[str, Any] | None:
        """The evaluation already recorded at `step` (a resumed run that had finished), if any."""
        return next((r for r in reversed(read_jsonl(self.eval_log)) if r.get("step") == step and "f1" in r), None)

    def log_eval(self, record: Mapping[str, Any]) -> None:
        """One evaluation (with the training stats that led to it) to the log, the trackers and metrics.jsonl."""
        logger.info("eval at step %d: %s", record["step"], format_metrics(record))
        self.tracker_log({f"eval/{k}": v for k, v in record.items() if k not in ("step", "epoch")}, step=record["step"])
        if self.is_main:
            append_jsonl(self.eval_log, record)

    def log_stop(self, *, step: int, epoch: int, reason: str, key: str = "stopped") -> None:
        """Why the run ended before its last update, as a line of metrics.jsonl under `key` ("interrupted" for a
        signal, after which it can go on); once: a resumed run that was stopped does not say it again."""
        logger.info("the run stopped at update %d: %s", step, reason)
        record = {"step": step, "epoch": epoch, key: reason}
        if self.is_main and record not in read_jsonl(self.eval_log):
            append_jsonl(self.eval_log, record)

    def finish(self, *, title: str) -> Path | None:
        """Close the bar and draw training_curves.png."""
        self.bar.close()
        if not self.is_main:
            return None
        return plot_curves(self.train_log, self.eval_log, self.out / "training_curves.png", title=title)


def check_writable(folder: str | Path) -> None:
    """Create `folder` if needed and prove a file can be written in it, before any work is done there."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"{folder} is a file, not a folder to write into")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".bertqa-write-test-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as err:
        raise OSError(f"cannot write into {folder}: {err.strerror or err}") from err


def read_json(path: str | Path) -> Any:
    """The JSON in `path`, or None when there is no such file."""
    path = Path(path)
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def jsonable(value: Any) -> Any:
    """`value` with every NaN or infinity replaced by None, so it can be written as strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


def dumps(value: Any, **kwargs: Any) -> str:
    """Strict JSON (no NaN or Infinity, which many readers reject): non-finite numbers become null."""
    return json.dumps(jsonable(value), allow_nan=False, **kwargs)


def format_metrics(metrics: Mapping[str, Any]) -> str:
    keys = ("exact", "f1", "HasAns_f1", "NoAns_f1", "best_f1", "best_f1_thresh", "train_loss")
    line = " ".join(f"{k}={metrics[k]:.2f}" for k in keys if k in metrics)
    peak = metrics.get("peak_memory_mib")
    return line + (f" peak_memory={peak / 1024:.2f}GiB" if peak is not None else "")


def append_jsonl(path: str | Path, record: Mapping[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(dumps(record) + "\n")


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def truncate_jsonl(path: str | Path, max_step: int) -> None:
    """Drop records logged after `max_step`: a resumed run repeats those steps and logs them again."""
    records = read_jsonl(path)
    if records:
        kept = [r for r in records if r.get("step", 0) <= max_step]
        Path(path).write_text("".join(json.dumps(r) + "\n" for r in kept))


def plot_curves(train_log: str | Path, eval_log: str | Path, out: str | Path, *, title: str = "") -> Path | None:
    """Three panels against optimizer updates: training loss, learning rate, and dev EM/F1. None if no data."""
    train, evals = read_jsonl(train_log), read_jsonl(eval_log)
    if not train and not evals:
        return None
    try:
        import matplotlib
    except ImportError:  # the run's numbers are saved already; a missing plot must not fail it at its last step
        logger.warning("matplotlib is not installed, so %s was not drawn (pip install matplotlib)", out)
        return None
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4), sharex=True)
    losses = [(r["step"], r["loss"]) for r in train if "loss" in r]  # step 0 has a learning rate but no loss yet
    if losses:
        axes[0].plot(*zip(*losses), label="train loss")
    axes[0].set(xlabel="optimizer update", ylabel="loss", title="training loss")
    axes[1].plot([r["step"] for r in train], [r["lr"] for r in train], color="tab:orange")
    axes[1].set(xlabel="optimizer update", ylabel="learning rate", title="learning rate")
    # On SQuAD v2 the overall F1 alone hides a model that answers "no answer" to everything (about 50%), so the
    # HasAns/NoAns split and the F1 at the best no-answer threshold are drawn too when they were measured.
    curves = (
        ("exact", "o-", "EM"),
        ("f1", "s-", "F1"),
        ("HasAns_f1", "^--", "HasAns F1"),
        ("NoAns_f1", "v--", "NoAns F1"),
        ("best_f1", "d:", "F1, best threshold"),
    )
    for key, style, label in curves:
        points = [(r["step"], r[key]) for r in evals if key in r]
        if points:
            axes[2].plot(*zip(*points), style, label=label)
    axes[2].set(xlabel="optimizer update", ylabel="score (%)", title="dev EM / F1")
    for ax in axes:
        ax.grid(alpha=0.3)
    if axes[2].lines:  # a run stopped before its first evaluation has no scores to name
        axes[2].legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return Path(out)


def plot_reliability(tables: Mapping[str, Sequence[Mapping[str, float]]], out: str | Path) -> Path | None:
    """A reliability diagram per table (`bertqa.metrics.calibration_bins`, by what its probability states): each
    bin's accuracy against its mean confidence, on the diagonal when the probability means what it says, with the
    questions per bin below. None when matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:
        logger.warning("matplotlib is not installed, so %s was not drawn (pip install matplotlib)", out)
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(tables), figsize=(5 * len(tables), 6), squeeze=False, height_ratios=(3, 1))
    for col, (name, table) in enumerate(tables.items()):
        top, bottom = axes[0][col], axes[1][col]
        centres = [(row["low"] + row["high"]) / 2 for row in table]
        width = table[0]["high"] - table[0]["low"]
        filled = [row for row in table if row["count"]]
        top.bar(centres, [row["accuracy"] for row in table], width=width * 0.9, alpha=0.7, label="accuracy")
        top.plot([r["confidence"] for r in filled], [r["accuracy"] for r in filled], "o", color="k", label="bins")
        top.plot([0, 1], [0, 1], "--", color="tab:red", label="perfectly calibrated")
        top.set(xlim=(0, 1), ylim=(0, 1), ylabel="share right", title=name)
        top.legend(loc="upper left")
        bottom.bar(centres, [row["count"] for row in table], width=width * 0.9, color="tab:gray")
        bottom.set(xlim=(0, 1), xlabel="stated probability", ylabel="questions")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return Path(out)


def log_plan(
    data: Any,
    labels: Any,
    accelerator: Any,
    *,
    total_steps: int,
    per_epoch: int,
    warmup_steps: int,
    batch: int,
    planned_later: bool = False,
    disk: str | None = None,
) -> None:
    """What was loaded, the label self-check and the derived values, once: what the run will really do. `data` is
    the run's `bertqa.cache.RunData`, `labels` its `LabelReport`, `disk` what its checkpoints will take."""
    examples = data.examples
    for report in examples.reports:
        logger.info("%s%s", "loaded " if isinstance(report, LoadReport) else "", report.format())
        for line in report.warnings if isinstance(report, LoadReport) else ():
            logger.warning("%s", line)
    if examples.v2 and not is_v2(examples.eval):
        logger.info(
            "a SQuAD v2 run (its training data holds unanswerable questions): scored as v2.0 although the "
            "evaluation data has none, so that answering 'no answer' counts"
        )
    if examples.v2 and examples.calibration_off is None:  # without calibration it was said at loading
        chosen = (
            f"{len(examples.calibration):,} held-out training questions"
            if examples.calibration
            else "the evaluation data itself (optimistic: no held-out training question has no answer)"
        )
        logger.info("the no-answer threshold is chosen at each evaluation on %s", chosen)
    logger.info("label self-check:\n%s", labels.format())
    calibration = data.calibration_features
    logger.info(
        "%d train examples -> %d windows; %s%d eval examples -> %d windows (%s, from %s); %d processes on %s, "
        "precision %s; effective batch %d windows; %s%d updates (%d per epoch, %d warmup)%s",
        *(len(examples.train), len(data.train_features)),
        f"{len(examples.calibration)} held-out calibration examples (the no-answer threshold's) -> "
        f"{len(calibration)} windows; "
        if calibration is not None
        else "",
        *(len(examples.eval), len(data.eval_features)),
        "v2.0" if examples.v2 else "v1.1",
        examples.eval_described,
        *(accelerator.num_processes, accelerator.device, accelerator.mixed_precision),
        *(batch, "at most " if planned_later else "", total_steps, per_epoch, warmup_steps),
        ", until the time budget's plan" if planned_later else "",
    )
    if disk is not None:
        logger.info("disk: %s", disk)
