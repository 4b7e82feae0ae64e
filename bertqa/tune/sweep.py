"""Hyperparameter sweeps with Optuna: the search space over `TrainConfig` fields (`parse_space`, `load_space`,
`check_space`), what a trial samples from it (`suggest`), the `on_evaluate` observer that lets Optuna prune a run
(`PruningObserver`), the study on disk (`open_study`, refused when the file is something else; `claim_study`, which
ties it to one sweep dir, base config and space), one trial as a run of `engine.fit` (`trial_config`,
`make_objective`) and the loop that runs trials until the study holds enough (`run_trials`, `counted_trials`).

Optuna is an optional extra (`pip install -e ".[sweep]"`): it is imported only inside the functions that use it, so
importing this module costs nothing without it. `scripts/sweep.py` is the command line on top.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import shutil
import sqlite3
import types
import typing
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bertqa.config import BOOKKEEPING, TrainConfig, computation_changes, read_json_object

if TYPE_CHECKING:
    import optuna

__all__ = [
    "Param",
    "PruningObserver",
    "check_space",
    "claim_study",
    "counted_trials",
    "describe",
    "grid_sampler",
    "grid_size",
    "load_space",
    "make_objective",
    "open_study",
    "parse_param",
    "parse_space",
    "run_trials",
    "suggest",
    "trial_config",
]

logger = logging.getLogger("bertqa")

# Bookkeeping to a resumed run, but a trial's score is the best F1 of its evaluations and the pruner compares them at
# the same update: how often a trial is evaluated changes its score and when it can be pruned. So these may be
# searched, and a study's recorded base config keeps them.
SCORED = frozenset({"eval_every_steps", "eval_before_training"})

# Optuna's own tables: a file holding both was written by Optuna; any other database is someone else's.
_OPTUNA_TABLES = {"studies", "version_info"}


@dataclass(frozen=True)
class Param:
    """One searched setting: a range `low`..`high` (on a log scale if `log`; whole numbers for an int field), or
    `choices`."""

    name: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: tuple[Any, ...] = ()


def _field_kind(name: str) -> tuple[type, bool]:
    """The type of a sweepable TrainConfig field and whether it may be None."""
    hints = typing.get_type_hints(TrainConfig)
    if name not in hints:
        raise ValueError(f"sweep parameter {name!r}: not a TrainConfig setting (see scripts/train.py --help)")
    if name in BOOKKEEPING - SCORED:  # output_dir and resume among them: the sweep owns where each trial runs
        raise ValueError(
            f"sweep parameter {name!r}: a bookkeeping setting (it does not change what a run computes); set it "
            "with its flag instead"
        )
    hint = hints[name]
    args = typing.get_args(hint)
    union = isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union
    base = next(a for a in args if a is not type(None)) if union else hint
    if base not in (bool, int, float, str):
        raise ValueError(f"sweep parameter {name!r}: a {base} setting cannot be searched")
    return base, union and type(None) in args


def _parse_value(name: str, text: str, kind: type, optional: bool) -> Any:
    """`text` read as the field's type (the words a flag of scripts/train.py takes)."""
    text = text.strip()
    if optional and text.lower() in {"none", "null"}:
        return None
    if kind is bool:
        if text.lower() in {"true", "1", "yes", "on", "false", "0", "no", "off"}:
            return text.lower() in {"true", "1", "yes", "on"}
        raise ValueError(f"sweep parameter {name!r}: expected true or false, got {text!r}")
    if kind in (int, float):
        try:
            value = kind(text)
        except ValueError:
            wanted = "a whole number" if kind is int else "a number"
            raise ValueError(f"sweep parameter {name!r}: expected {wanted}, got {text!r}") from None
        return _checked(name, value, kind, optional)
    if not text:
        raise ValueError(f"sweep parameter {name!r}: an empty value")
    return text


def _checked(name: str, value: Any, kind: type, optional: bool) -> Any:
    """A value from a JSON space file (or parsed text) checked against the field's type; an int is a fine float."""
    if value is None and optional:
        return None
    whole = isinstance(value, int) and not isinstance(value, bool)
    number = whole or (isinstance(value, float) and math.isfinite(value))  # NaN or inf is no point of a search
    ok = {bool: isinstance(value, bool), int: whole, float: number}.get(kind, isinstance(value, kind))
    if not ok:
        raise ValueError(f"sweep parameter {name!r}: expected {kind.__name__}, got {value!r}")
    return float(value) if kind is float else value


def parse_param(name: str, spec: str | list[Any]) -> Param:
    """One parameter from `LOW..HIGH`, `LOW..HIGH:log` or `a,b,c` (or a list of choices, from a space file)."""
    kind, optional = _field_kind(name)
    if isinstance(spec, list):
        values = [
            _parse_value(name, v, kind, optional) if isinstance(v, str) else _checked(name, v, kind, optional)
            for v in spec
        ]
        return _choice(name, values)
    if not isinstance(spec, str):
        raise ValueError(f"sweep parameter {name!r}: give LOW..HIGH, LOW..HIGH:log or a,b,c (or a list), got {spec!r}")
    body, log = (spec[: -len(":log")], True) if spec.endswith(":log") else (spec, False)
    if ".." not in body:
        if log:
            raise ValueError(f"sweep parameter {name!r}: ':log' goes with a range LOW..HIGH, got {spec!r}")
        return _choice(name, [_parse_value(name, v, kind, optional) for v in body.split(",")])
    if kind not in (int, float):
        raise ValueError(f"sweep parameter {name!r}: a {kind.__name__} setting takes choices a,b,c, not a range")
    low_text, _, high_text = body.partition("..")
    if ":" in high_text:  # lin, linear, ...: a typo of ':log' would otherwise read as a number that is not one
        scale = high_text[high_text.index(":") :]
        raise ValueError(f"sweep parameter {name!r}: unknown scale {scale!r} in {spec!r} (only ':log')")
    low, high = (_parse_value(name, t, kind, optional=False) for t in (low_text, high_text))
    if low >= high:
        raise ValueError(f"sweep parameter {name!r}: LOW must be below HIGH, got {spec!r}")
    if log and low <= 0:
        raise ValueError(f"sweep parameter {name!r}: a log-scale range needs LOW above 0, got {spec!r}")
    return Param(name, low, high, log)


def _choice(name: str, values: list[Any]) -> Param:
    if not values:
        raise ValueError(f"sweep parameter {name!r}: no choices given")
    if len(set(map(repr, values))) < len(values):
        raise ValueError(f"sweep parameter {name!r}: a choice is given twice in {values}")
    allowed = next(f.metadata.get("choices") for f in dataclasses.fields(TrainConfig) if f.name == name)
    wrong = [v for v in values if allowed and v not in allowed]
    if wrong:  # a typo would otherwise fail every trial that draws it, found only when it runs
        raise ValueError(f"sweep parameter {name!r}: {wrong[0]!r} is not one of {', '.join(allowed)}")
    return Param(name, choices=tuple(values))


def parse_space(items: Iterable[str] = (), file: str | Path | None = None) -> dict[str, Param]:
    """The space from `NAME=SPEC` strings (`--param`) and/or a JSON space file (`load_space`); each parameter once."""
    space: dict[str, Param] = {}
    for item in items:
        name, sep, spec = item.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or not name or not spec.strip():
            raise ValueError(f"sweep parameter {item!r}: expected NAME=SPEC (lr=1e-5..1e-3:log, batch_size=16,32)")
        if name in space:
            raise ValueError(f"sweep parameter {name!r}: given twice")
        space[name] = parse_param(name, spec.strip())
    from_file = load_space(file) if file is not None else {}
    twice = sorted(set(space) & set(from_file))
    if twice:
        raise ValueError(f"sweep parameter {twice[0]!r}: given as NAME=SPEC and in {file}")
    if not space and not from_file:
        raise ValueError("nothing to search: give parameters NAME=SPEC (--param lr=1e-5..1e-3:log) or --space FILE")
    return {**space, **from_file}


def load_space(path: str | Path) -> dict[str, Param]:
    """The space from a JSON file: an object of NAME -> SPEC string or NAME -> list of choices."""
    raw = read_json_object(path, 'a JSON object of NAME -> SPEC (e.g. {"lr": "1e-5..1e-3:log"})')
    if not raw:
        raise ValueError(f"{path}: the space is empty; give at least one NAME -> SPEC")
    try:
        return {name: parse_param(name, spec) for name, spec in raw.items()}
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from err


def describe(param: Param) -> str:
    """The parameter as `--param` spells it: `LOW..HIGH`, `LOW..HIGH:log` or `a,b,c`."""
    if param.choices:
        return ",".join(
            "none" if v is None else str(v).lower() if isinstance(v, bool) else str(v) for v in param.choices
        )
    return f"{param.low}..{param.high}" + (":log" if param.log else "")


def check_space(base: TrainConfig, space: Mapping[str, Param]) -> None:
    """Refuse, before any trial, a value every trial that draws it would fail on: each range's ends and each choice,
    one at a time, must make a config `TrainConfig` accepts with the base. (What only the model can tell, such as
    num_layers above its depth, still fails the trials that draw it.)"""
    for name, p in space.items():
        for value in p.choices or (p.low, p.high):
            try:
                base.replace(**{name: value})
            except ValueError as err:
                raise ValueError(f"sweep parameter {name!r}: {value!r} is refused: {err}") from None


def grid_sampler(space: Mapping[str, Param], *, seed: int) -> optuna.samplers.GridSampler:
    """A sampler that runs every combination of the choices once (in a seeded order): for a space of a few settings
    with a few values each, where a sweep should see them all rather than draw some twice. Ranges are refused."""
    import optuna

    ranges = [name for name, p in space.items() if not p.choices]
    if ranges:
        raise ValueError(
            f"a grid sweep takes choices only (a,b,c), not ranges: {', '.join(ranges)}; give them as choices, or "
            "use the tpe sampler"
        )
    return optuna.samplers.GridSampler({name: list(p.choices) for name, p in space.items()}, seed=seed)


def grid_size(space: Mapping[str, Param]) -> int:
    """How many trials a grid over `space` holds."""
    return math.prod(len(p.choices) for p in space.values())


def suggest(trial: optuna.trial.Trial, space: Mapping[str, Param]) -> dict[str, Any]:
    """This trial's value of every parameter, drawn by Optuna's sampler."""
    values: dict[str, Any] = {}
    for name, p in space.items():
        if p.choices:
            values[name] = trial.suggest_categorical(name, list(p.choices))
        elif isinstance(p.low, int):
            values[name] = trial.suggest_int(name, p.low, int(p.high), log=p.log)
        else:
            values[name] = trial.suggest_float(name, p.low, p.high, log=p.log)
    return values


@dataclass
class PruningObserver:
    """An `on_evaluate` observer for `engine.fit`: reports each evaluation's F1 to the trial, at its update, and ends
    the run (`StopTraining`) when the study's pruner says this trial will not be among the best."""

    trial: optuna.trial.Trial
    pruned_at: int | None = None  # the update the run was pruned at

    def __call__(self, record: Mapping[str, Any]) -> None:
        from bertqa.engine import StopTraining

        self.trial.report(record["f1"], record["step"])
        if self.trial.should_prune():
            self.pruned_at = record["step"]
            raise StopTraining(f"pruned by optuna at step {record['step']}")


def _check_storage_file(path: Path) -> None:
    """Refuse a file that exists but is no Optuna study, before Optuna adds its tables to someone else's database."""
    if not path.exists() or (path.is_file() and path.stat().st_size == 0):
        return
    if path.is_dir():
        raise ValueError(f"{path}: a folder, not a study file (give --storage FILE.db)")
    with path.open("rb") as f:
        if f.read(16) != b"SQLite format 3\x00":
            raise ValueError(f"{path}: not an Optuna study (not an SQLite database); give another --storage file")
    # Read-only, so even the check leaves the file as it was.
    with contextlib.closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)) as db:
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    if not _OPTUNA_TABLES.issubset(tables):
        raise ValueError(
            f"{path}: an SQLite database without Optuna's tables, not a study; give another --storage file"
        )


def open_study(
    path: str | Path,
    study_name: str,
    *,
    pruner: optuna.pruners.BasePruner | None = None,
    sampler: optuna.samplers.BaseSampler | None = None,
    heartbeat_interval: int = 60,
    grace_period: int = 180,
) -> optuna.Study:
    """The study `study_name` in the SQLite file `path`, created if new, loaded if not, so a stopped sweep resumes and
    several processes (or machines sharing the file) add to one study. Trials record a heartbeat: a trial whose
    process was killed is marked failed after `grace_period` seconds without one and run again with its parameters.
    """
    import optuna

    path = Path(path)
    _check_storage_file(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    retry = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None)  # Optuna >= 4.9 renamed it
    with warnings.catch_warnings():  # the heartbeat is marked experimental; it is what makes a killed trial retried
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        callback = (
            {"heartbeat_stale_trial_callback": retry(max_retry=2)}
            if retry
            else {"failed_trial_callback": optuna.storages.RetryFailedTrialCallback(max_retry=2)}
        )
        storage = optuna.storages.RDBStorage(
            f"sqlite:///{path.resolve()}", heartbeat_interval=heartbeat_interval, grace_period=grace_period, **callback
        )
    study = optuna.create_study(
        storage=storage,
        study_name=study_name,
        direction="maximize",
        load_if_exists=True,
        pruner=pruner,
        sampler=sampler,
    )
    if study.directions != [optuna.study.StudyDirection.MAXIMIZE]:
        raise ValueError(f"{path}: study {study_name!r} does not maximize one value; give another --study-name")
    return study


def _settings(base: TrainConfig, space: Mapping[str, Param], sweep_dir: str | Path) -> dict[str, Any]:
    """What makes a study's trials comparable, as kept in its user attributes: the base config less the searched and
    the bookkeeping settings (SCORED kept), the space, and the sweep dir whose trial-NNN folders hold its runs."""
    skip = (BOOKKEEPING - SCORED) | set(space)
    record = {k: v for k, v in base.to_dict().items() if k not in skip}
    return json.loads(
        json.dumps(
            {
                "sweep_dir": str(Path(sweep_dir).resolve()),
                "base": record,
                "space": {name: describe(p) for name, p in space.items()},
            }
        )
    )


def _changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """`name old -> new` for each base setting and searched parameter that differs between two `_settings`."""
    before, after = old["base"], new["base"]
    changed = computation_changes(before, {**before, **after})  # the evaluation data as what it resolves to
    changed |= {k: (before.get(k), after.get(k)) for k in SCORED if before.get(k) != after.get(k)}
    lines = [f"{k} {a} -> {b}" for k, (a, b) in sorted(changed.items()) if k in after]
    for name in sorted(set(old["space"]) | set(new["space"])):
        was, now = (s["space"].get(name, "not searched") for s in (old, new))
        if was != now:
            lines.append(f"searched {name} {was} -> {now}")
    return lines


def claim_study(
    study: optuna.Study,
    base: TrainConfig,
    space: Mapping[str, Param],
    sweep_dir: str | Path,
    *,
    allow_changes: bool = False,
) -> None:
    """Tie the study to `sweep_dir`, `base` and `space` (its user attributes), or check they are the ones it holds.
    A study of another sweep dir is refused: its trial numbers would name that dir's folders and results. Changed
    settings are refused once a trial has a score, since new trials would not compare with it, unless
    `allow_changes` (warned; the new settings are recorded)."""
    new, held = _settings(base, space, sweep_dir), study.user_attrs
    if held.get("sweep_dir", new["sweep_dir"]) != new["sweep_dir"]:
        raise ValueError(
            f"study {study.study_name!r} holds the trials of {held['sweep_dir']}, not of "
            f"{new['sweep_dir']}: give another --study-name (or --storage)"
        )
    changes = _changes(held, new) if "base" in held else []
    scored = any(t.state.name in ("COMPLETE", "PRUNED") for t in study.get_trials(deepcopy=False))
    if changes and scored and not allow_changes:
        raise ValueError(
            f"study {study.study_name!r} was made with other settings ({'; '.join(changes)}): its trials "
            "would not compare with new ones; rerun with its settings, start a new --output-dir, or "
            "pass --allow-changed-base to add to it anyway"
        )
    if changes:
        logger.warning(
            "study %r: settings changed (%s); recorded for the trials from now on", study.study_name, "; ".join(changes)
        )
    for key, value in new.items():
        study.set_user_attr(key, value)


def counted_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """The finished trials that count towards a sweep's total: complete, pruned, and failed ones. A trial of a killed
    or interrupted sweep is failed too, but it is run again with its parameters, so only the new run counts."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    retried = {n for t in trials for n in t.system_attrs.get("retry_history", [])}
    retried |= {t.user_attrs["retry_of"] for t in trials if "retry_of" in t.user_attrs}
    done = (TrialState.COMPLETE, TrialState.PRUNED)
    return [t for t in trials if t.state in done or (t.state == TrialState.FAIL and t.number not in retried)]


def trial_config(
    base: TrainConfig, params: Mapping[str, Any], out: str | Path, *, save_model: bool = False
) -> TrainConfig:
    """The config a trial runs: the base with its parameters, in `out`, never resumed. Trial numbers are never
    reused within a study, and a study belongs to one sweep dir (`claim_study`): a folder already there holds
    nothing worth keeping, so it is overwritten."""
    bookkeeping = dict(output_dir=str(out), save_model=save_model, resume=None, overwrite=True, accept_changes=False)
    return base.replace(**params, **bookkeeping)


def make_objective(
    base: TrainConfig, space: Mapping[str, Param], sweep_dir: str | Path, *, save_model: bool = False
) -> Callable[[optuna.trial.Trial], float]:
    """One trial: `fit` the base config with the trial's parameters in `sweep_dir/trial-NNN`; its value is the best
    F1 seen. The trial's config, steps, why it stopped early and error (if it raised) are kept as its user
    attributes. The space is checked against the base first (`check_space`)."""
    check_space(base, space)

    def objective(trial: optuna.trial.Trial) -> float:
        import optuna

        from bertqa.engine import fit

        params = suggest(trial, space)
        out = Path(sweep_dir) / f"trial-{trial.number:03d}"
        observer = PruningObserver(trial)
        try:
            config = trial_config(base, params, out, save_model=save_model)
            trial.set_user_attr("config", json.loads(json.dumps(config.to_dict())))
            summary = fit(config, on_evaluate=[observer])
        except KeyboardInterrupt:  # not the trial's fault: a resumed sweep runs it again first
            trial.study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})
            raise
        except Exception as err:
            trial.set_user_attr("error", f"{type(err).__name__}: {err}"[:2000])
            raise
        finally:  # a finished trial is never resumed (a killed one runs again from the start): free the disk
            shutil.rmtree(out / "checkpoints", ignore_errors=True)
        trial.set_user_attr("steps", summary["steps"])
        trial.set_user_attr("best_f1_seen", summary["best_f1_seen"])
        trial.set_user_attr("stopped", summary["stopped_early"])  # early stopping's reason, or the pruner's
        if observer.pruned_at is not None:
            raise optuna.TrialPruned(summary["stopped_early"])
        return summary["best_f1_seen"]

    return objective


def run_trials(study: optuna.Study, objective: Callable[[optuna.trial.Trial], float], total: int) -> None:
    """Run trials until the study holds `total` counted ones (`counted_trials`, also those of other processes);
    none when it has them already. A trial that raises is recorded as failed and the sweep goes on; Ctrl-C stops it.
    """
    if len(counted_trials(study)) >= total:
        return

    def stop_when_done(study: optuna.Study, _trial: optuna.trial.FrozenTrial) -> None:
        if len(counted_trials(study)) >= total:
            study.stop()

    # gc after each trial: the last trial's model and optimizer state are freed before the next one is built
    study.optimize(objective, callbacks=[stop_when_done], catch=(Exception,), gc_after_trial=True)
