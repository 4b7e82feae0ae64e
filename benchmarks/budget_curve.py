"""F1 against the time budget, from time-budget runs: a table and a plot, one line per precision.

    python benchmarks/budget_curve.py runs/quick-4m runs/quick runs/quick-16m --plot docs/budget_curve.png

Each RUN is a training run's folder (or a sweep's trial-NNN folder): its `config.json` holds the plan
(`_budget_plan`: budget, precision, updates) and its `metrics.jsonl` the evaluations; the last evaluation's F1 is
the run's. Runs of the same precision and budget (several seeds) are shown as their mean, their spread as a bar, and
each in the table.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from bertqa.cli import HelpFormatter, run, writable_file


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("runs", nargs="+", type=Path, metavar="RUN", help="folders of time-budget runs")
    p.add_argument("--plot", type=writable_file, help="write the plot here (PNG)")
    return p.parse_args(argv)


def read_run(folder: Path) -> dict[str, Any]:
    """A run's budget, precision, updates, questions and last EM/F1; refused, naming the folder, when it is no
    finished time-budget run."""
    config, metrics = folder / "config.json", folder / "metrics.jsonl"
    if not config.is_file() or not metrics.is_file():
        raise ValueError(f"{folder}: no config.json and metrics.jsonl here; give the folder of a training run")
    plan = json.loads(config.read_text()).get("_budget_plan")
    if plan is None:
        raise ValueError(f"{folder}: not a time-budget run (its config.json holds no _budget_plan)")
    lines = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    evaluations = [line for line in lines if "f1" in line]  # a stopped run's last record says why, with no scores
    if not evaluations:
        raise ValueError(f"{folder}: metrics.jsonl holds no evaluation yet")
    last = evaluations[-1]
    return {
        "run": str(folder),
        "precision": plan["precision"],
        "budget_min": plan["budget_s"] / 60,
        "updates": last["step"],
        "questions": plan["questions"],
        "exact": last["exact"],
        "f1": last["f1"],
    }


def group(rows: list[dict[str, Any]]) -> dict[tuple[str, float], list[float]]:
    """F1s by (precision, budget in minutes)."""
    groups: dict[tuple[str, float], list[float]] = defaultdict(list)
    for row in rows:
        groups[(row["precision"], row["budget_min"])].append(row["f1"])
    return dict(sorted(groups.items()))


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| precision | budget | updates | questions | EM | F1 | run |", "|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["precision"], r["budget_min"], r["run"])):
        lines.append(
            f"| {r['precision']} | {r['budget_min']:g} min | {r['updates']} | {r['questions']:,} | {r['exact']:.2f} | "
            f"{r['f1']:.2f} | {r['run']} |"
        )
    lines += ["", "| precision | budget | runs | F1 mean | spread (max - min) |", "|---|---|---|---|---|"]
    for (precision, minutes), f1s in group(rows).items():
        lines.append(
            f"| {precision} | {minutes:g} min | {len(f1s)} | {statistics.mean(f1s):.2f} | {max(f1s) - min(f1s):.2f} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    by_precision: dict[str, list[tuple[float, list[float]]]] = defaultdict(list)
    for (precision, minutes), f1s in group(rows).items():
        by_precision[precision].append((minutes, f1s))
    for precision, points in by_precision.items():
        minutes = [m for m, _ in points]
        means = [statistics.mean(f) for _, f in points]
        spread = [[statistics.mean(f) - min(f) for _, f in points], [max(f) - statistics.mean(f) for _, f in points]]
        ax.errorbar(minutes, means, yerr=spread, marker="o", capsize=4, label=precision)
    ax.set_xlabel("time budget (minutes; training and evaluation)")
    ax.set_ylabel("F1 (mean; bar: lowest to highest)")
    ax.set_title("F1 against the time budget")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rows = [read_run(folder) for folder in args.runs]
    print(table(rows))
    if args.plot:
        plot(rows, args.plot)
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    run(main)
