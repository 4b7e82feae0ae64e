"""Fine-tune a BERT-family model on SQuAD and report the official EM/F1.

Examples:
  accelerate launch scripts/train.py --preset quick            # real data, within 10 minutes on a 2-core CPU
  accelerate launch scripts/train.py --preset full-v1 --time-budget 1h   # as much of SQuAD as an hour allows
  accelerate launch scripts/train.py --preset recipe           # 8000/2000 answerable examples, 2 epochs
  accelerate launch --num_processes 2 scripts/train.py --preset quick --output-dir runs/ddp
  python scripts/train.py --preset quick --resume latest       # continue after a crash
"""

from __future__ import annotations

import json

from bertqa.cli import config_from_args, config_parser, run, setup_logging


def main(argv: list[str] | None = None) -> int:
    args = config_parser(__doc__).parse_args(argv)
    setup_logging()
    from bertqa.engine import fit

    config = config_from_args(args)
    summary = fit(config)
    final = summary["final"]
    report = summary["label_report"]
    if summary["final"] and _is_main():
        print(
            json.dumps(
                {
                    "exact": round(final["exact"], 2),
                    "f1": round(final["f1"], 2),
                    **{k: round(final[k], 2) for k in ("HasAns_f1", "NoAns_f1", "best_f1") if k in final},
                    "best_f1_seen": round(summary["best_f1_seen"], 2),
                    "steps": summary["steps"],
                    "train_time_s": round(summary["train_time_s"], 1),
                    "wall_time_s": round(summary["wall_time_s"], 1),
                    "label_match_rate": round(report.match_rate, 4),
                    "peak_memory_mib": summary["peak_memory_mib"],
                    **({"stopped_early": summary["stopped_early"]} if summary["stopped_early"] else {}),
                    **_budget(summary["budget_plan"]),
                    "output_dir": summary["output_dir"],
                }
            )
        )
    return 0


def _budget(plan: dict | None) -> dict:
    """What a time-budget run planned, beside what it did."""
    if plan is None:
        return {}
    return {
        "time_budget_s": plan["budget_s"],
        "planned_steps": plan["planned_steps"],
        "questions": plan["questions"],
        "precision": plan["precision"],
    }


def _is_main() -> bool:
    import os

    return os.environ.get("RANK", "0") == "0"


if __name__ == "__main__":
    run(main)
