"""The training config: one frozen, validated dataclass that holds every tunable, plus named presets.

Only `engine.fit` (and the scripts) read it; everything below `fit` takes explicit values. Each field's `help`
metadata is what `scripts/train.py --help` shows, so the CLI and the config cannot drift apart. A run saves it as
`config.json`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bertqa.data import Window
from bertqa.examples import parse_column_map
from bertqa.sources import eval_source

__all__ = [
    "BOOKKEEPING",
    "PRESETS",
    "TrainConfig",
    "computation_changes",
    "format_duration",
    "kept_on_resume",
    "load_config",
    "parse_duration",
    "preset",
    "read_json_object",
]

# A duration setting (`time_budget`): hours, minutes and seconds, or a number of seconds.
_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0}
_DURATION = re.compile(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m(?:in)?)?(?:(\d+(?:\.\d+)?)s)?")


def parse_duration(value: str | float, *, name: str = "time_budget") -> float:
    """Seconds in a duration: a number of seconds (600, "600", "90s") or hours/minutes/seconds ("10m", "1h30m",
    "1h 30m 15s", "2.5m"). Refused naming the setting and the accepted forms."""
    seconds: float | None = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip().lower().replace(" ", "")
        if re.fullmatch(r"\d+(?:\.\d+)?", text):
            seconds = float(text)
        elif text and (match := _DURATION.fullmatch(text)):
            seconds = sum(float(part) * unit for part, unit in zip(match.groups(), _UNITS.values()) if part)
    if seconds is None or not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(
            f"{name} {value!r} is not a duration: give seconds (600) or hours, minutes and seconds such as 90s, "
            "10m, 1h30m"
        )
    return seconds


def format_duration(seconds: float) -> str:
    """'8 min 5 s', '1 h 2 min', '45 s', '0.4 s': how a person reads a length of time."""
    if seconds < 10:
        return f"{max(0.0, seconds):.1f} s"
    s = round(seconds)
    h, m, s = s // 3600, s % 3600 // 60, s % 60
    if h:
        return f"{h} h {m} min"
    return f"{m} min {s} s" if m else f"{s} s"


def _f(default: Any, help: str, **kwargs: Any) -> Any:
    return field(default=default, metadata={"help": help, **kwargs})


@dataclass(frozen=True)
class TrainConfig:
    # data
    model: str = _f("minilm-l6", "model alias (minilm-l6), local Hugging Face folder or hub id (bert-base-uncased)")
    train_data: str = _f(
        "train-v1.1",
        "bundled name (train-v1.1, dev-v1.1, dev-v2.0), a file (SQuAD .json, or records as .jsonl, .json, .csv, "
        ".parquet) or a hub dataset id[:split]; a trailing [a:b] keeps articles a..b-1 only (dev-v2.0[:25])",
    )
    eval_data: str | None = _f(
        None,
        "evaluation data, same forms as train_data (hub: squad:validation); unset: dev-v1.1 when training on the "
        "bundled train-v1.1, otherwise a held-out eval_split of the training data",
    )
    eval_split: float | None = _f(
        None,
        "hold out this share of the training data for evaluation, whole articles (titles) at a time; unset: as "
        "eval_data says",
    )
    calibration_split: float = _f(
        0.05,
        "SQuAD v2 data: hold out this share of the training data (whole articles; passages for small data) to "
        "choose the no-answer threshold on, so the evaluation score is not tuned on the evaluation data; 0: no "
        "calibration, the default threshold 0 (no answer when its score beats the best span's)",
    )
    column_map: str | None = _f(
        None,
        "your column names, for training data (and evaluation data without its own eval_column_map): "
        "'context=passage,question=query,answer_text=gold'",
    )
    eval_column_map: str | None = _f(
        None, "the evaluation data's column names when they differ from column_map's ('standard': the usual ones)"
    )
    skip_bad_records: bool = _f(
        False,
        "drop invalid records (an empty context, an answer not in its context, a repeated id, ...) instead of "
        "stopping; how many is logged, the first few by file, line and id",
    )
    answerable_only: bool = _f(False, "drop unanswerable questions from training and evaluation data")
    negatives: int = _f(
        0,
        "add up to this many unanswerable examples per answerable training question: the question paired with "
        "another passage of its article (without titles: the lexically closest) that does not hold its answer. "
        "Makes the run SQuAD v2 (a calibrated no-answer threshold); a held-out evaluation share gets them too",
    )
    max_train_examples: int | None = _f(None, "seeded random subset of training *examples* (all if unset)")
    max_eval_examples: int | None = _f(
        None, "seeded random subset of evaluation examples (all windows kept); also caps a v2 run's calibration ones"
    )
    max_seq_length: int = _f(Window.max_seq_length, "tokens per window (question + context + special tokens)")
    doc_stride: int = _f(Window.doc_stride, "tokens shared by consecutive windows of a long context")
    max_query_length: int = _f(Window.max_query_length, "questions are cut to this many tokens")
    max_answer_length: int = _f(30, "longest predicted answer, in tokens")
    label_check_min: float = _f(0.99, "fail if fewer in-window labels than this decode to the gold answer")
    cache_dir: str | None = _f("~/.cache/bertqa", "tokenized windows are cached here between runs (none: off)")
    tokenize_workers: int = _f(1, "processes that tokenize (the same windows for any number; helps on many cores)")
    # optimisation
    epochs: float = _f(2.0, "passes over the training windows (fractions allowed)")
    max_steps: int | None = _f(None, "stop after this many optimizer updates (overrides epochs)")
    time_budget: str | None = _f(
        None,
        "train to a time budget (600, 90s, 10m, 1h30m): the first updates are timed and the run is planned so that "
        "training and its evaluations end within it, the LR decaying to 0 at the last update; a seeded draw of the "
        "training questions it has time for, whole (more passes, up to epochs, when it has time for more)",
    )
    batch_size: int = _f(32, "windows per micro-batch on each process")
    grad_accum: int = _f(1, "micro-batches per optimizer update")
    lr: float = _f(3e-5, "peak learning rate")
    schedule: str = _f("linear", "learning-rate decay after warmup", choices=("linear", "cosine", "constant"))
    warmup_ratio: float = _f(0.1, "share of the optimizer updates spent warming up linearly from 0")
    weight_decay: float = _f(0.01, "AdamW weight decay (not applied to biases and LayerNorm weights)")
    adam_eps: float = _f(1e-8, "AdamW epsilon")
    max_grad_norm: float = _f(1.0, "clip the gradient norm to this (0 disables)")
    seed: int = _f(42, "seed for initialisation, subsets, shuffling and dropout")
    layer_lr_decay: float = _f(
        1.0,
        "layer-wise LR decay (1 = off): the QA head gets lr, the top encoder layer lr x this, each layer below the "
        "LR of the one above x this, the embeddings the lowest (BERT, RoBERTa, ELECTRA, DeBERTa, DistilBERT)",
    )
    freeze_embeddings: bool = _f(
        False,
        "train no embedding weights (about half of MiniLM's): no gradient or AdamW update for them; with "
        "freeze_layers, the backward pass stops at the lowest layer that trains",
    )
    freeze_layers: int = _f(
        0,
        "train none of the lowest N encoder layers (with freeze_embeddings: no backward pass through them, so each "
        "update is cheaper; on the budgets measured in docs/TRAINING.md the extra updates did not make up for it)",
    )
    budget_freeze_below: int = _f(
        0,
        "a time_budget run whose plan, timed with every layer training, has fewer updates than this freezes the "
        "embeddings and the lowest budget_freeze_layers layers and plans again at the faster rate (0: never, as in "
        "the presets: at 200 to 1,000 updates it cost 4-6 F1, docs/TRAINING.md)",
    )
    budget_freeze_layers: int = _f(2, "how many of the lowest encoder layers budget_freeze_below freezes")
    early_stopping_patience: int | None = _f(
        None, "end the run after this many evaluations in a row without an F1 gain of early_stopping_min_delta"
    )
    early_stopping_min_delta: float = _f(0.0, "the smallest F1 gain (points) that resets early stopping's count")
    # a smaller student, and distillation
    num_layers: int | None = _f(
        None, "keep only this many encoder layers of the model (a smaller student); which ones: layer_pick"
    )
    layer_pick: str = _f(
        "first",
        "which layers num_layers keeps: the first N, or every k-th (k = depth // N, as DistilBERT took every "
        "second layer of BERT)",
        choices=("first", "every-kth"),
    )
    teacher: str | None = _f(
        None,
        "distil from this trained QA model (a folder bertqa or transformers saved, same tokenizer): the loss mixes "
        "the gold-span loss with the KL divergence to the teacher's start/end distributions",
    )
    distill_alpha: float = _f(0.5, "with a teacher: the KL term's share of the loss (1 - alpha: the gold spans')")
    distill_temperature: float = _f(2.0, "with a teacher: softmax temperature of both distributions in the KL term")
    # adapters and memory
    lora_r: int = _f(
        0,
        "train LoRA adapters of this rank (peft) instead of every weight: the base model frozen, the QA head "
        "trained in full (0: off). final_model/ and best_model/ are the merged plain models, each with the "
        "adapter alone in adapter/",
    )
    lora_alpha: float | None = _f(
        None, "LoRA's scale: an adapter's update is scaled by lora_alpha / lora_r (unset: 2r)"
    )
    lora_dropout: float = _f(0.1, "dropout on the adapters' input")
    lora_targets: tuple[str, ...] = _f(
        (),
        "the linear layers that get adapters, by name (unset: the attention projections: query key value for "
        "BERT, RoBERTa, ELECTRA, ALBERT; query_proj key_proj value_proj for DeBERTa-v2/v3; q_lin k_lin v_lin for "
        "DistilBERT)",
    )
    gradient_checkpointing: bool = _f(
        False,
        "keep only each encoder layer's input in the forward pass and compute the rest again in the backward pass: "
        "a fraction of the activation memory, at about 1.3-1.4x the time of an update (docs/MEMORY.md)",
    )
    # speed
    mixed_precision: str = _f(
        "auto",
        "autocast precision; auto = bf16 where the hardware runs it natively (GPUs with bf16, CPUs with AMX or "
        "AVX512-BF16), else fp32; no = fp32 (on the command line fp32 is taken too)",
        choices=("auto", "no", "bf16", "fp16"),
    )
    group_by_length: bool = _f(True, "batch windows of similar length together (less padding)")
    pad_to_multiple_of: int = _f(8, "pad each batch to a multiple of this many tokens")
    eval_batch_size: int = _f(64, "windows per evaluation batch on each process")
    attn_implementation: str = _f("sdpa", "attention kernel passed to transformers (sdpa, eager, ...)")
    attention_dropout: float | None = _f(
        None,
        "dropout on attention probabilities (unset: the model's own, 0.1 for BERT); PyTorch's fused CPU attention "
        "kernel runs only without it, so 0 trains faster on CPUs (1.38x on SQuAD windows, more on long ones)",
    )
    hidden_dropout: float | None = _f(
        None,
        "dropout on hidden states (unset: the model's own, 0.1 for BERT); each dropout draws a random mask, about "
        "6% of an fp32 update on a CPU and 11% of a bf16 one, and a run of a few hundred updates needs none",
    )
    compile: bool = _f(False, "torch.compile the model")
    tf32: bool = _f(True, "allow TF32 matmuls on NVIDIA GPUs")
    num_workers: int = _f(0, "DataLoader worker processes")
    # evaluation, logging, checkpoints
    eval_every_steps: int | None = _f(None, "also evaluate every N optimizer updates (always after each epoch)")
    eval_before_training: bool = _f(False, "evaluate the untrained model first (the baseline that training must beat)")
    log_every: int = _f(10, "log loss/LR every N updates (the loss is read from the device only then)")
    save_every_steps: int | None = _f(None, "checkpoint every N updates (always after each epoch)")
    keep_checkpoints: int = _f(
        2, "how many recent checkpoints to keep (each holds the weights and, unless turned off, the optimizer state)"
    )
    save_optimizer_state: bool = _f(
        True,
        "checkpoints hold AdamW's moments (twice the weights' size), so a resumed run continues exactly; false: "
        "checkpoints a third of the size, and a resumed run starts the moments afresh",
    )
    output_dir: str = _f("runs/default", "where checkpoints, metrics.jsonl, plots and the final model go")
    resume: str | None = _f(None, "checkpoint folder to resume from, or 'latest' for the newest in output_dir")
    report_to: tuple[str, ...] = _f((), "Accelerate trackers to log to, e.g. tensorboard")
    save_model: bool = _f(True, "save the final and the best-by-F1 model with save_pretrained")
    overwrite: bool = _f(False, "start afresh in an output_dir that holds a finished run (its records are replaced)")
    accept_changes: bool = _f(
        False, "resume although settings that change the computation differ from the checkpoint's (recorded)"
    )
    collective_timeout_s: int = _f(
        1800, "multi-process runs: give up when another process has not answered for this many seconds"
    )

    def __post_init__(self) -> None:
        for name in ("report_to", "lora_targets"):
            if isinstance(getattr(self, name), list):  # a list from JSON or Python means the same
                object.__setattr__(self, name, tuple(getattr(self, name)))
        if isinstance(self.time_budget, (int, float)) and not isinstance(self.time_budget, bool):
            seconds = f"{float(self.time_budget):f}".rstrip("0").rstrip(".")  # seconds, from JSON or Python
            object.__setattr__(self, "time_budget", seconds)
        problems = _type_problems(self) or _value_problems(self)
        if problems:
            raise ValueError("invalid TrainConfig: " + "; ".join(problems))

    @property
    def window(self) -> Window:
        """The window settings as one value, which every layer below the config takes."""
        return Window(self.max_seq_length, self.doc_stride, self.max_query_length)

    def example_settings(self) -> dict[str, Any]:
        """The keyword arguments of `bertqa.sources.run_examples` that this config sets: which examples a run uses."""
        return {
            "train_data": self.train_data,
            "eval_data": self.eval_data,
            "eval_split": self.eval_split,
            "calibration_split": self.calibration_split,
            "answerable": self.answerable_only,
            "max_train_examples": self.max_train_examples,
            "max_eval_examples": self.max_eval_examples,
            "seed": self.seed,
            "column_map": self.column_map,
            "eval_column_map": self.eval_column_map,
            "skip_bad_records": self.skip_bad_records,
            "negatives": self.negatives,
        }

    def unused_settings(self) -> list[tuple[str, str]]:
        """(setting, the one it needs) for settings changed from their default that do nothing without another."""
        return [
            (name, needs)
            for name, needs in _NEEDS
            if getattr(self, name) != _DEFAULTS[name] and not getattr(self, needs)  # unset, 0: off
        ]

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with `changes`. A length given here wins over the other kind already set: `max_steps` replaces a
        time budget (a preset's, say) and `time_budget` replaces `max_steps`; the one replaced is logged."""
        if "time_budget" in changes and changes["time_budget"] is None and self.time_budget is not None:
            logging.getLogger("bertqa").info(
                "time_budget %s is off: the run's length is max_steps or epochs (%g)", self.time_budget, self.epochs
            )
        for given, other in (("max_steps", "time_budget"), ("time_budget", "max_steps")):
            if changes.get(given) is not None and other not in changes and getattr(self, other) is not None:
                logging.getLogger("bertqa").info(
                    "%s %s replaces %s %s", given, changes[given], other, getattr(self, other)
                )
                changes[other] = None
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")


# Settings that only mean something beside another: (setting, the one it needs).
_NEEDS = (
    ("eval_column_map", "eval_data"),  # a held-out share is of the training data, read with column_map
    ("early_stopping_min_delta", "early_stopping_patience"),
    ("layer_pick", "num_layers"),
    ("distill_alpha", "teacher"),
    ("distill_temperature", "teacher"),
    ("lora_alpha", "lora_r"),
    ("lora_dropout", "lora_r"),
    ("lora_targets", "lora_r"),
)
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig)}


def read_json_object(path: str | Path, expected: str) -> dict[str, Any]:
    """A JSON file that must hold an object; refused naming the file, with the line of a syntax error."""
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON at line {err.lineno} column {err.colno}: {err.msg}") from err
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected {expected}, got {type(raw).__name__}")
    return raw


def load_config(path: str | Path) -> TrainConfig:
    """Read a `config.json` written by `TrainConfig.save`; unknown keys are an error, not silently dropped.

    Keys starting with `_` are records, not settings (e.g. `_changes`, the changes accepted on resume).
    """
    raw = read_json_object(path, "a JSON object of settings")
    raw = {k: v for k, v in raw.items() if not k.startswith("_")}
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"{path}: unknown config keys {unknown}")
    if isinstance(raw.get("report_to"), list):
        raw["report_to"] = tuple(raw["report_to"])
    try:
        return TrainConfig(**raw)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from err


# Settings that only change what is recorded or how fast: a resumed run may change them. Every other field changes
# the computation (data, windows, model, optimiser, schedule, batch, seed, precision, length).
BOOKKEEPING = frozenset(
    {
        "eval_every_steps",
        "eval_before_training",
        "log_every",
        "save_every_steps",
        "keep_checkpoints",
        "output_dir",
        "save_optimizer_state",
        "resume",
        "report_to",
        "save_model",
        "eval_batch_size",
        "num_workers",
        "tokenize_workers",
        "cache_dir",
        "label_check_min",
        "overwrite",
        "accept_changes",
        "collective_timeout_s",
        "gradient_checkpointing",  # the same losses, in less memory and more time
    }
)


def computation_changes(old: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """{field: (old, new)} for the fields outside BOOKKEEPING that differ between two saved configs (`to_dict`).

    The evaluation data is compared as what it resolves to (see `bertqa.sources.eval_source`), so spelling out a
    default is no change.
    """
    old, current = (_effective(json.loads(json.dumps(d))) for d in (old, new))  # tuples as lists, as saved
    changes = {
        name: (old.get(name), value)
        for name, value in current.items()
        if name not in BOOKKEEPING and name in old and old[name] != value and name not in ("eval_data", "eval_split")
    }
    budgets = changes.get("time_budget", (None, None))
    if None not in budgets and parse_duration(budgets[0]) == parse_duration(budgets[1]):  # "8m" is "480"
        del changes["time_budget"]
    if "eval_data" in old:
        before = eval_source(old.get("train_data", new["train_data"]), old.get("eval_data"), old.get("eval_split"))
        after = eval_source(new["train_data"], new.get("eval_data"), new.get("eval_split"))
        if before != after:
            changes["eval_data"] = (before, after)
    return changes


def _effective(settings: dict[str, Any]) -> dict[str, Any]:
    """A saved config with its defaults that depend on another setting spelt out (lora_alpha unset is 2r)."""
    if settings.get("lora_r") and settings.get("lora_alpha") is None:
        return {**settings, "lora_alpha": 2.0 * settings["lora_r"]}
    return settings


def kept_on_resume(old: dict[str, Any], new: dict[str, Any]) -> str | None:
    """Why a resume from a run saved with `old` settings cannot go on with `new` ones even when changes are
    accepted, or None. A time budget cannot come or go: a budget run takes its batches in another order (whole
    questions), so the batches already trained on would not be the ones skipped."""
    if (old.get("time_budget") is None) != (new.get("time_budget") is None):
        return (
            "a time budget cannot be added to or removed from a run when it is resumed, even with --accept-changes; "
            "resume with its own kind of length, or start afresh in another output_dir"
        )
    before, after = old.get("lora_r", 0), new.get("lora_r", 0)
    if before != after:  # the checkpoint's adapters are of another shape, or there are none
        return (
            f"lora_r cannot change when a run is resumed ({before} -> {after}), even with --accept-changes: the "
            "checkpoint holds adapters of another rank, or none; resume with its own, or start afresh in another "
            "output_dir"
        )
    return None


_POSITIVE = (
    "max_seq_length",
    "max_query_length",
    "max_answer_length",
    "batch_size",
    "grad_accum",
    "eval_batch_size",
    "log_every",
    "pad_to_multiple_of",
    "tokenize_workers",
    "keep_checkpoints",
    "collective_timeout_s",
)
_POSITIVE_WHEN_SET = ("max_train_examples", "max_eval_examples", "max_steps", "eval_every_steps", "save_every_steps")


def _type_problems(config: TrainConfig) -> list[str]:
    """A value of the wrong type, named with its key (a config.json edited by hand, or a call from Python)."""
    hints = typing.get_type_hints(TrainConfig)
    problems = []
    for f in dataclasses.fields(config):
        hint = hints[f.name]
        value, allowed = getattr(config, f.name), typing.get_args(hint) if _is_union(hint) else (hint,)
        ok = any(_is(value, kind) for kind in allowed)
        if not ok:
            wanted = " or ".join("none" if k is type(None) else getattr(k, "__name__", str(k)) for k in allowed)
            problems.append(f"key {f.name!r}: expected {wanted}, got {type(value).__name__} {value!r}")
    return problems


def _is_union(hint: Any) -> bool:
    return isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union


def _is(value: Any, kind: Any) -> bool:
    if kind is type(None):
        return value is None
    if kind is bool:
        return isinstance(value, bool)
    if kind is float:  # a whole number is a fine float
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if typing.get_origin(kind) is tuple:
        return isinstance(value, tuple) and all(isinstance(v, str) for v in value)
    return isinstance(value, kind)


def _value_problems(c: TrainConfig) -> list[str]:
    problems = [f"{name} must be positive" for name in _POSITIVE if getattr(c, name) <= 0]
    problems += [
        f"{name} must be positive when set"
        for name in _POSITIVE_WHEN_SET
        if getattr(c, name) is not None and getattr(c, name) <= 0
    ]
    if c.time_budget is not None and c.max_steps is not None:
        problems.append("give time_budget or max_steps, not both: the budget chooses the number of updates")
    if c.epochs <= 0 and not c.max_steps:
        problems.append("epochs must be positive (or set max_steps)")
    if c.negatives < 0:
        problems.append(f"negatives must be a whole number >= 0, got {c.negatives}")
    if not 0 <= c.calibration_split < 1:
        problems.append("calibration_split must be 0 (no calibration) or between 0 and 1")
    if c.eval_split is not None and not 0 < c.eval_split < 1:
        problems.append(f"eval_split must be above 0 and below 1, got {c.eval_split}")
    if c.eval_split is not None and c.eval_data is not None:
        problems.append("give eval_data or eval_split, not both (eval_split holds out part of train_data)")
    if c.attention_dropout is not None and not 0 <= c.attention_dropout < 1:
        problems.append("attention_dropout must be in [0, 1)")
    if c.hidden_dropout is not None and not 0 <= c.hidden_dropout < 1:
        problems.append("hidden_dropout must be in [0, 1)")
    for name in ("freeze_layers", "budget_freeze_below", "budget_freeze_layers"):
        if getattr(c, name) < 0:
            problems.append(f"{name} must be a whole number >= 0, got {getattr(c, name)}")
    if not 0 <= c.warmup_ratio < 1:
        problems.append("warmup_ratio must be in [0, 1)")
    if not 0 < c.lr < float("inf"):  # nan fails this too
        problems.append(f"lr must be positive and finite, got {c.lr}")
    if not 0 <= c.seed < 2**32:
        problems.append(f"seed must be a whole number from 0 to 2**32 - 1, got {c.seed}")
    if not str(c.output_dir).strip():
        problems.append("output_dir must name a folder (an empty one would be the current folder)")
    if not 0 < c.layer_lr_decay <= 1:
        problems.append(f"layer_lr_decay must be in (0, 1] (1 = off), got {c.layer_lr_decay}")
    if c.early_stopping_patience is not None and c.early_stopping_patience < 1:
        problems.append(f"early_stopping_patience must be at least 1 evaluation, got {c.early_stopping_patience}")
    if not 0 <= c.early_stopping_min_delta < 100:  # F1 points: a gain of 100 or more cannot happen
        problems.append(f"early_stopping_min_delta must be in [0, 100) F1 points, got {c.early_stopping_min_delta}")
    if c.num_layers is not None and c.num_layers < 1:
        problems.append(f"num_layers must be at least 1, got {c.num_layers}")
    if not 0 <= c.distill_alpha <= 1:
        problems.append(f"distill_alpha must be in [0, 1], got {c.distill_alpha}")
    if not 0 < c.distill_temperature < float("inf"):
        problems.append(f"distill_temperature must be positive and finite, got {c.distill_temperature}")
    if not 0 <= c.label_check_min <= 1:
        problems.append("label_check_min must be in [0, 1]")
    return problems + _lora_problems(c) + _unreadable(c)


def _lora_problems(c: TrainConfig) -> list[str]:
    problems = []
    if c.lora_r < 0:
        problems.append(f"lora_r must be a whole number >= 0 (0: off), got {c.lora_r}")
    if c.lora_alpha is not None and not 0 < c.lora_alpha < float("inf"):
        problems.append(f"lora_alpha must be positive and finite, got {c.lora_alpha}")
    if not 0 <= c.lora_dropout < 1:
        problems.append(f"lora_dropout must be in [0, 1), got {c.lora_dropout}")
    if len(set(c.lora_targets)) < len(c.lora_targets):
        problems.append(f"lora_targets names a layer twice: {list(c.lora_targets)}")
    if any(not name.strip() or "," in name for name in c.lora_targets):
        problems.append(
            f"lora_targets must be names of linear layers, one per item (--lora-targets query value), got "
            f"{list(c.lora_targets)}"
        )
    if c.lora_r and c.compile:
        problems.append("lora_r with compile: bertqa does not compile a model with LoRA adapters; set compile false")
    return problems


def _named(setting: str, read: Callable[[Any], Any], value: Any) -> Any:
    """`read(value)`, its error named by the setting it reads."""
    try:
        return read(value)
    except ValueError as err:
        raise ValueError(f"{setting}: {err}") from None


def _unreadable(c: TrainConfig) -> list[str]:
    """The settings that do not read as what they must be: a choice not among its choices, a duration, a column
    map, a window with no room for the context."""
    problems = []
    for f in dataclasses.fields(c):
        choices = f.metadata.get("choices")
        if choices and getattr(c, f.name) not in choices:
            problems.append(f"{f.name} must be one of {', '.join(choices)}, got {getattr(c, f.name)!r}")
    checks = (
        lambda: c.time_budget is None or parse_duration(c.time_budget),
        lambda: _named("column_map", parse_column_map, c.column_map),
        lambda: _named("eval_column_map", parse_column_map, c.eval_column_map),
        c.window.context_room,
    )
    for check in checks:
        try:
            check()
        except ValueError as err:
            problems.append(str(err))
    return problems


# Named starting points. Each is a set of changes to the defaults; the CLI applies flags on top.
PRESETS: dict[str, dict[str, Any]] = {
    # A real fine-tune on real SQuAD that ends, evaluation included, within about 10 minutes on any 2-core CPU: an
    # 8-minute time budget for training and evaluation decides how many of a seeded 20,000 questions it trains on
    # (more passes on a GPU). No evaluation before training: in fp32 on such a CPU it costs over a minute of the
    # budget. The rest was chosen by sweeping what a budget of a few hundred updates buys (docs/TRAINING.md, "What
    # an 8-minute budget buys"): batches of 16 (twice the updates of 32, F1 +4.5 in fp32), the embeddings frozen
    # (half of MiniLM's weights, no AdamW update for them), no dropout on attention probabilities (PyTorch's fused
    # CPU attention kernel then runs, 1.38x faster) or on hidden states (its masks cost 6-11% of an update); lr 2e-4.
    "quick": {
        "max_train_examples": 20000,
        "time_budget": "8m",
        "attention_dropout": 0.0,
        "hidden_dropout": 0.0,
        "freeze_embeddings": True,
        "max_eval_examples": 1000,
        "epochs": 3.0,
        "lr": 2e-4,
        "batch_size": 16,
        "eval_batch_size": 64,
        "log_every": 10,
        "output_dir": "runs/quick",
    },
    # The course notebook's setup (answerable SQuAD, 8000/2000 examples, 2 epochs, 384/128), done right.
    "recipe": {
        "answerable_only": True,
        "max_train_examples": 8000,
        "max_eval_examples": 2000,
        "epochs": 2.0,
        "lr": 5e-5,
        "batch_size": 32,
        "eval_before_training": True,
        "eval_every_steps": 100,
        "output_dir": "runs/recipe",
    },
    # SQuAD v2 offline: only the v2 dev set ships, so train on its first 25 articles (8,017 questions, 4,040 of them
    # unanswerable) and evaluate on the other 10 (3,856 questions, 1,905 unanswerable). No article is in both.
    "v2-split": {
        "train_data": "dev-v2.0[:25]",
        "eval_data": "dev-v2.0[25:]",
        "epochs": 2.0,
        "lr": 5e-5,
        "batch_size": 32,
        "eval_before_training": True,
        "output_dir": "runs/v2-split",
    },
    # SQuAD v2 from what ships offline, scored on dev-v2.0[25:] (3,856 questions, 1,905 unanswerable; no article in
    # training). Trains on the first 80 articles of train-v1.1 (17,859 questions), each with one negative (the
    # question on another passage of its article), plus dev-v2.0[:25] with its 4,040 real unanswerable questions;
    # the threshold is chosen on 5% of those articles, held out. docs/RESULTS.md has what it reaches and how long.
    "v2-offline": {
        "train_data": "train-v1.1[:80]+dev-v2.0[:25]",
        "eval_data": "dev-v2.0[25:]",
        "negatives": 1,
        "attention_dropout": 0.0,
        "epochs": 1.0,
        "lr": 1e-4,
        "batch_size": 32,
        "eval_before_training": True,
        "output_dir": "runs/v2-offline",
    },
    # The whole bundled SQuAD v1.1 train set, scored on the whole official dev set.
    "full-v1": {"epochs": 2.0, "lr": 1e-4, "batch_size": 32, "output_dir": "runs/full-v1"},
}


def preset(name: str | None, **changes: Any) -> TrainConfig:
    """A config from a preset (or the defaults when `name` is None), with `changes` applied on top (`replace`: a
    `max_steps` given here replaces the preset's time budget)."""
    if name is not None and name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    return TrainConfig(**(PRESETS[name] if name else {})).replace(**changes)
