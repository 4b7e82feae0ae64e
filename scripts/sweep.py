"""Search hyperparameters with Optuna: each trial trains the base config with its own values (`engine.fit`) and
scores the best F1 it reached. Needs the sweep extra: pip install -e ".[sweep]".

Examples:
  python scripts/sweep.py --preset quick --max-train-examples 2000 --max-eval-examples 300 --max-steps 120 \\
      --eval-every-steps 40 --param lr=2e-5..3e-4:log --param warmup_ratio=0..0.2 --param batch_size=16,32 \\
      --trials 20 --output-dir runs/lr-sweep
  (the same command again)              resumes: finished trials are kept, only the missing ones run
  (the same command with --trials 30)   ten more trials in the same study
  python scripts/sweep.py --preset quick --space space.json --trials 20 --output-dir runs/space-sweep
  python scripts/train.py --config runs/lr-sweep/best_config.json     train the best trial's settings, model saved

Base config: what scripts/train.py runs with the same --preset, --config and flags; a trial changes only the
searched settings; --print-config shows it as a trial runs it. Search space: --param NAME=SPEC (repeatable) and/or
--space FILE; NAME is a setting of train.py (lr, warmup_ratio, eval_every_steps, ...), not a bookkeeping one such as
output_dir or log_every:
  lr=1e-5..1e-3:log        a range on a log scale (a whole-number setting gets whole numbers: max_steps=100..400)
  warmup_ratio=0..0.2      a range
  batch_size=16,32         choices (also true/false, words, none: schedule=linear,cosine)
  space.json               {"lr": "1e-5..1e-3:log", "schedule": ["linear", "cosine"]}

Study: kept in --storage (an SQLite file) under --study-name, so stopping and rerunning resumes it. It is tied to
its sweep dir, base config (less searched and bookkeeping settings) and search space: a rerun with other settings is
refused once a trial has a score (--allow-changed-base adds to it anyway), as is another study or --storage for the
same sweep dir, or the study of another sweep dir. Each range's ends and each choice are checked against the base
config before any trial. Failed trials count towards --trials: when all have failed, raise --trials or start a new
--output-dir. --resume, --overwrite and --accept-changes are refused: trials always start afresh. A trial of a
killed sweep is marked failed after 3 minutes without a heartbeat and run again with its values; one stopped by
Ctrl-C runs again first. Several processes can work on one study: start the same command in each (one per GPU with
CUDA_VISIBLE_DEVICES=0, 1, ...). A trial that raises (a NaN loss, values TrainConfig refuses) is recorded as failed
with its error and the sweep goes on.

Pruning (--pruner median): once 3 trials have finished, a trial whose F1 at an evaluation is below the median of the
earlier trials' at that update is stopped there (never at update 0). It compares evaluations at the same update:
set --eval-every-steps, and fix the length with --max-steps when the batch size is searched.

Writes to the sweep dir: trial-NNN/ (each trial's run: config.json, metrics.jsonl, training_curves.png; checkpoints
are removed when the trial ends, models saved only with --save-model true), best_config.json (the best trial's full
config, for train.py --config), trials.csv, trials.md (with why a trial stopped early), trials.png (F1 by trial) and
sweep.json (the study's name and storage file).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from bertqa.cli import BoolFlag, config_from_args, config_parser, positive_int, run, setup_logging
from bertqa.config import TrainConfig
from bertqa.training.reporting import check_writable, read_json

RESULTS = ("best_config.json", "trials.csv", "trials.md", "trials.png")
# TrainConfig flags that mean nothing here: every trial starts afresh in its own folder, and the study is what a rerun
# resumes. Refused rather than silently ignored.
NOT_FOR_SWEEPS = {
    "resume": "rerun the same command to resume the sweep; each trial starts afresh",
    "overwrite": "trial folders are always replaced; give another --output-dir for a new sweep",
    "accept_changes": "for resuming a run; --allow-changed-base adds to a study made with other settings",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = config_parser(__doc__)
    group = parser.add_argument_group("sweep")
    group.add_argument(
        "--trials",
        type=positive_int,
        default=20,
        help="finished trials wanted in the study, counting earlier runs' (default: 20)",
    )
    group.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="NAME=SPEC",
        help="a searched setting: LOW..HIGH, LOW..HIGH:log or a,b,c (repeatable)",
    )
    group.add_argument("--space", type=Path, metavar="FILE", help="JSON object NAME -> SPEC or list of choices")
    group.add_argument("--sweep-dir", type=Path, help="where trials and results go (default: the config's output_dir)")
    group.add_argument(
        "--storage",
        metavar="FILE.db",
        help="the study's SQLite file (default: SWEEP_DIR/study.db); an existing file must be an Optuna study",
    )
    group.add_argument("--study-name", help="the study in --storage (default: the sweep dir's name)")
    group.add_argument(
        "--pruner",
        choices=("median", "none"),
        default="median",
        help="stop trials that fall behind the median at an evaluation (default: median)",
    )
    group.add_argument(
        "--sampler",
        choices=("tpe", "grid"),
        default="tpe",
        help="tpe: Optuna's default, each trial drawn in the light of the earlier ones; grid: every combination of "
        "the choices once, in a seeded order (choices only; --trials is then at most the grid's size)",
    )
    group.add_argument(
        "--allow-changed-base",
        action=BoolFlag,
        default=False,
        help="add to a study made with another base config or search space (warned)",
    )
    for action in parser._actions:  # argparse has no public way to hide an inherited flag
        if action.dest in NOT_FOR_SWEEPS:
            action.help = argparse.SUPPRESS
    return parser.parse_args(argv)


def check_flags(args: argparse.Namespace) -> None:
    given = [name for name in NOT_FOR_SWEEPS if hasattr(args, name)]  # a config flag not given is not in args
    if given:
        flag = "--" + given[0].replace("_", "-")
        raise ValueError(f"{flag} is not a sweep setting: {NOT_FOR_SWEEPS[given[0]]}")


def print_trial_config(args: argparse.Namespace, base: TrainConfig, space: dict[str, Any], sweep_dir: Path) -> None:
    """--print-config: what a trial runs, less the searched settings (listed under `_searched`)."""
    from bertqa.tune.sweep import describe, trial_config

    config = trial_config(base, {}, sweep_dir / "trial-NNN", save_model=getattr(args, "save_model", False))
    shown = {k: v for k, v in config.to_dict().items() if k not in space}
    shown["_searched"] = {name: describe(p) for name, p in space.items()}  # `_` keys are records to load_config
    sys.stdout.write(json.dumps(shown, indent=2) + "\n")


def check_sweep_dir(sweep_dir: Path, study_name: str | None, storage: Path | None) -> tuple[str, Path, bool]:
    """Trial folders are named by trial number, which each study counts from 0: one sweep dir holds one study, in
    one storage file. Returns the study's name and file (sweep.json's, when not given) and whether the sweep dir is
    new to any study."""
    held = read_json(sweep_dir / "sweep.json")
    if held is None:
        return study_name or sweep_dir.resolve().name, storage or sweep_dir / "study.db", True
    if study_name is not None and held["study_name"] != study_name:
        raise ValueError(
            f"{sweep_dir} holds the trials of study {held['study_name']!r} ({held['storage']}); "
            "give another --sweep-dir, or that --study-name to add to it"
        )
    if storage is not None and str(storage.resolve()) != held["storage"]:
        raise ValueError(
            f"{sweep_dir} holds the trials of a study in {held['storage']}, not in {storage.resolve()}; "
            "give another --sweep-dir, or that --storage to add to it"
        )
    return held["study_name"], Path(held["storage"]), False


def trial_rows(study: Any) -> list[dict[str, Any]]:
    """One row per trial: number, state, best F1 seen, updates, minutes, the trial's values, its error."""
    trials = study.get_trials(deepcopy=False)
    names = sorted({name for t in trials for name in t.params})
    stopped = {t.number: t.user_attrs.get("stopped") or "" for t in trials}  # why a trial ended before its length
    retried_as = {t.user_attrs["retry_of"]: t.number for t in trials if "retry_of" in t.user_attrs}
    retried_as |= {t.system_attrs["failed_trial"]: t.number for t in trials if "failed_trial" in t.system_attrs}
    rows = []
    for t in trials:
        f1 = (
            t.value if t.state.name == "COMPLETE" else t.user_attrs.get("best_f1_seen", t.user_attrs.get("best_f1"))
        )  # pruned: its best
        error = t.user_attrs.get("error", "")
        if t.number in retried_as and not error:
            error = f"killed or interrupted; run again as trial {retried_as[t.number]}"
        rows.append(
            {
                "trial": t.number,
                "state": t.state.name,
                "f1": None if f1 is None else round(f1, 2),
                "steps": t.user_attrs.get("steps"),
                "minutes": round(t.duration.total_seconds() / 60, 2) if t.duration else None,
                **{name: t.params.get(name) for name in names},
                "stopped": stopped[t.number],
                "error": error,
            }
        )
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "(no trials)\n"

    def cell(v: Any) -> str:  # 4 significant digits are plenty to read a sampled value by (trials.csv has them all)
        text = "" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    return "\n".join(lines + ["| " + " | ".join(cell(v) for v in row.values()) + " |" for row in rows]) + "\n"


def plot_trials(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """F1 by trial number: complete and pruned trials as points, the best so far as a line, failed ones marked."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(8, 4))
    for state, marker, color, label in (
        ("COMPLETE", "o", "tab:blue", "complete"),
        ("PRUNED", "x", "tab:orange", "pruned (F1 before it)"),
    ):
        points = [(r["trial"], r["f1"]) for r in rows if r["state"] == state and r["f1"] is not None]
        if points:
            ax.scatter(*zip(*points), marker=marker, color=color, label=label, zorder=3)
    best, so_far = [], float("-inf")
    for r in rows:
        if r["state"] == "COMPLETE" and r["f1"] is not None:
            so_far = max(so_far, r["f1"])
            best.append((r["trial"], so_far))
    if best and rows[-1]["trial"] > best[-1][0]:  # the line runs on to the last trial
        best.append((rows[-1]["trial"], so_far))
    if best:
        ax.step(*zip(*best), where="post", color="tab:green", alpha=0.6, label="best so far")
    for i, r in enumerate(r for r in rows if r["state"] == "FAIL"):
        ax.axvline(r["trial"], color="tab:red", linestyle=":", alpha=0.7, label="failed" if i == 0 else None)
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))  # trials are whole numbers
    ax.set(xlabel="trial", ylabel="best F1 seen (%)", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_results(study: Any, sweep_dir: Path) -> Any:
    """trials.csv, trials.md, trials.png and (once a trial completed) best_config.json; returns the best trial."""
    rows = trial_rows(study)
    with (sweep_dir / "trials.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["trial"])
        writer.writeheader()
        writer.writerows(rows)
    (sweep_dir / "trials.md").write_text(markdown(rows))
    plot_trials(rows, sweep_dir / "trials.png", f"study {study.study_name}")
    complete = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE" and "config" in t.user_attrs]
    if not complete:
        return None
    best = max(complete, key=lambda t: t.value)
    # The best trial's own config (the base it ran with may differ from today's flags), as a run of its own.
    config = TrainConfig(**best.user_attrs["config"])
    config.replace(output_dir=str(sweep_dir / "best"), save_model=True, overwrite=False, resume=None).save(
        sweep_dir / "best_config.json"
    )
    return best


def failures(rows: list[dict[str, Any]], counted: int, total: int, best: Any) -> str | None:
    """What to say about failed trials: the first one's error, and what to do when no trial is left to run."""
    failed = [r for r in rows if r["state"] == "FAIL" and not r["error"].startswith("killed or interrupted")]
    if not failed:
        return None
    first = f"first error, trial {failed[0]['trial']}: {failed[0]['error'] or 'none recorded'}"
    if best is None and counted >= total:  # a rerun would run nothing: the failed trials count towards --trials
        return f"all {counted} finished trials failed ({first}); raise --trials or start a new --output-dir"
    return f"{len(failed)} failed; {first}"


def report(study: Any, sweep_dir: Path, total: int) -> int:
    """Write the results, print the best trials, failures and where the files are; 1 when no trial has completed."""
    from bertqa.tune.sweep import counted_trials

    best = write_results(study, sweep_dir)
    rows = sorted(trial_rows(study), key=lambda r: (r["f1"] is None, -(r["f1"] or 0), r["trial"]))
    print(markdown(rows[:10]), end="")
    states = [r["state"] for r in rows]
    counts = ", ".join(f"{states.count(s)} {s.lower()}" for s in dict.fromkeys(states))
    print(f"{len(rows)} trials ({counts or 'none'}) in study {study.study_name!r}")
    names = "trials.csv, trials.md, trials.png" + (", best_config.json" if best else "")
    print(f"wrote {names} to {sweep_dir}")
    failed = failures(sorted(rows, key=lambda r: r["trial"]), len(counted_trials(study)), total, best)
    if failed:
        print(failed)
    if best is None:
        if not (failed or "").startswith("all "):
            print("no trial has completed yet: no best_config.json")
        return 1
    values = ", ".join(f"{k}={v}" for k, v in best.params.items())
    print(f"best: trial {best.number}, F1 {best.value:.2f} ({values})")
    print(f"train it: python scripts/train.py --config {sweep_dir / 'best_config.json'}")
    return 0


class QuietInterrupt(logging.Filter):
    """Drops Optuna's two warnings about a trial that Ctrl-C ended: the interrupt is no error of the trial's (it
    runs again first on resume), and its traceback would only bury the summary printed after it."""

    interrupted: str | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[0] is not None and issubclass(record.exc_info[0], KeyboardInterrupt):
            self.interrupted = record.getMessage().split(" failed", 1)[0]  # "Trial N"
            return False
        return not (self.interrupted and record.getMessage().startswith(f"{self.interrupted} failed with value"))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
    try:
        import optuna
    except ImportError:
        sys.exit('error: sweeps need Optuna: pip install -e ".[sweep]" (or pip install "optuna>=4.0")')
    from bertqa.tune import sweep

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("run sweep.py with python, one process per sweep; for several GPUs start one sweep on each")
    check_flags(args)
    space = sweep.parse_space(args.param, args.space)
    # config_from_args prints the base config for --print-config; a trial runs another, printed here
    base = config_from_args(argparse.Namespace(**{**vars(args), "print_config": False}))
    sweep_dir = args.sweep_dir or Path(base.output_dir)
    if args.print_config:
        print_trial_config(args, base, space, sweep_dir)
        return 0
    sweep.check_space(base, space)  # before a study is made for a sweep that cannot run
    if "://" in (args.storage or ""):
        raise ValueError(f"--storage takes an SQLite file (FILE.db), not a URL: {args.storage}")
    storage = Path(args.storage) if args.storage else None
    name, storage, new = check_sweep_dir(sweep_dir, args.study_name, storage)
    # Never at update 0 (n_warmup_steps=1): every trial's untrained model scores alike there.
    median = optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=1)
    pruner = median if args.pruner == "median" else optuna.pruners.NopPruner()
    sampler = sweep.grid_sampler(space, seed=base.seed) if args.sampler == "grid" else None
    study = sweep.open_study(storage, name, pruner=pruner, sampler=sampler)
    sweep.claim_study(study, base, space, sweep_dir, allow_changes=args.allow_changed_base)
    check_writable(sweep_dir)
    if new:
        (sweep_dir / "sweep.json").write_text(
            json.dumps({"study_name": name, "storage": str(storage.resolve())}) + "\n"
        )
    # A trial saves models only when asked on the command line: a sweep's trials are many, and usually discarded.
    objective = sweep.make_objective(base, space, sweep_dir, save_model=getattr(args, "save_model", False))
    quiet, optuna_log = QuietInterrupt(), logging.getLogger("optuna.study._optimize")
    optuna_log.addFilter(quiet)
    trials = min(args.trials, sweep.grid_size(space)) if args.sampler == "grid" else args.trials
    try:
        sweep.run_trials(study, objective, trials)
    except KeyboardInterrupt as stop:  # Ctrl-C, or SIGTERM (bertqa.training.interrupt.Interrupted says which)
        report(study, sweep_dir, trials)
        print("interrupted; the trial will run again first when resumed (rerun the same command)")
        return getattr(stop, "exit_code", 130)
    finally:
        optuna_log.removeFilter(quiet)
    return report(study, sweep_dir, trials)


if __name__ == "__main__":
    run(main)
