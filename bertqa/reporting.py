"""Run records a person can read: JSON-lines logs and a PNG of the training curves (loss, LR, EM/F1)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["append_jsonl", "plot_curves", "read_jsonl", "truncate_jsonl"]


def append_jsonl(path: str | Path, record: Mapping[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


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
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4), sharex=True)
    steps = [r["step"] for r in train]
    axes[0].plot(steps, [r["loss"] for r in train], label="train loss")
    axes[0].set(xlabel="optimizer update", ylabel="loss", title="training loss")
    axes[1].plot(steps, [r["lr"] for r in train], color="tab:orange")
    axes[1].set(xlabel="optimizer update", ylabel="learning rate", title="learning rate")
    # On SQuAD v2 the overall F1 alone hides a model that answers "no answer" to everything (about 50%), so the
    # HasAns/NoAns split and the F1 at the best no-answer threshold are drawn too when they were measured.
    curves = (("exact", "o-", "EM"), ("f1", "s-", "F1"), ("HasAns_f1", "^--", "HasAns F1"),
              ("NoAns_f1", "v--", "NoAns F1"), ("best_f1", "d:", "F1, best threshold"))  # fmt: skip
    for key, style, label in curves:
        points = [(r["step"], r[key]) for r in evals if key in r]
        if points:
            axes[2].plot(*zip(*points), style, label=label)
    axes[2].set(xlabel="optimizer update", ylabel="score (%)", title="dev EM / F1")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[2].legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return Path(out)
