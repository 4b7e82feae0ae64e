"""Recipe: a fixed-length run stopped at a deadline by a hook: what `--time-budget` is measured against.

A run set for N updates whose time runs out first is cut off in the middle of its schedule: its learning rate never
decays. `--time-budget` plans the run instead, so that the decay ends at the deadline. This recipe does the other
thing, on the public API: a hook raises `StopTraining` once `--train-seconds` of training have passed (counted
across a resume), and `fit` then evaluates and saves as at a normal end; the summary says why it stopped. Every flag of
train.py works here (the quick preset's own budget is turned off: this run keeps its fixed length).

  python recipes/stop_at_deadline.py --preset quick --max-train-examples 10000 --epochs 1 --train-seconds 420
"""

from __future__ import annotations

import json
import logging
import time

from bertqa import engine
from bertqa.cli import config_from_args, config_parser, positive_float, run, setup_logging


class StopAfter(engine.Hook):
    """A hook that ends the run once `seconds` of training have passed since the update it first saw. The seconds
    counted are its state: a run resumed with `--resume latest` goes on counting where its checkpoint was."""

    def __init__(self, seconds: float) -> None:
        self.seconds, self.used, self.mark = seconds, 0.0, None

    def on_update(self, run: engine.Run, update: engine.Update) -> None:
        now = time.perf_counter()
        self.used += now - self.mark if self.mark is not None else 0.0
        self.mark = now
        if self.used >= self.seconds:
            raise engine.StopTraining(f"deadline: {self.seconds:g} s of training passed at update {update.step}")

    def state_dict(self) -> dict[str, float]:
        return {"used": self.used}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.used = state["used"]


def main(argv: list[str] | None = None) -> int:
    parser = config_parser(__doc__)
    parser.add_argument("--train-seconds", type=positive_float, required=True, help="stop training after this long")
    args = parser.parse_args(argv)
    setup_logging()
    config = config_from_args(args)
    if config.time_budget is not None and "time_budget" in vars(args):
        logging.getLogger("bertqa").warning(
            "--time-budget %s is ignored: this recipe runs a fixed length, stopped by --train-seconds",
            config.time_budget,
        )
    config = config.replace(time_budget=None)
    summary = engine.fit(config, hooks=[StopAfter(args.train_seconds)])
    if summary["final"]:
        print(
            json.dumps(
                {
                    "f1": round(summary["final"]["f1"], 2),
                    "exact": round(summary["final"]["exact"], 2),
                    "steps": summary["steps"],
                    "stopped_early": summary["stopped_early"],
                    "train_time_s": round(summary["train_time_s"], 1),
                    "wall_time_s": round(summary["wall_time_s"], 1),
                }
            )
        )
    return 0


if __name__ == "__main__":
    run(main)
