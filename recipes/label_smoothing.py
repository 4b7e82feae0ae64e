"""Recipe: your own loss through `fit`, here label smoothing on top of bertqa's span loss.

The gold term is `engine.qa_loss` (start/end cross-entropy over each window's real tokens), computed on logits the
loss already has; a share `--smoothing` of the target is spread evenly over the window's real tokens instead of
sitting on the gold one. Everything else is `fit` as `scripts/train.py` runs it: every flag of train.py works here.

  python recipes/label_smoothing.py --preset quick --smoothing 0.1 --output-dir runs/quick-smoothed
"""

from __future__ import annotations

import json
from functools import partial

import torch

from bertqa import engine
from bertqa.cli import config_from_args, config_parser, probability, run, setup_logging


def smoothed_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], *, smoothing: float) -> torch.Tensor:
    """(1 - smoothing) x the gold-span loss + smoothing x the cross-entropy against a uniform target over the real
    tokens, for the start and the end alike. `smoothing=0` is `engine.default_loss` exactly."""
    out = model(**engine.model_inputs(batch))  # never the labels: the model would add its own, unmasked, loss
    gold = engine.qa_loss(out.start_logits, out.end_logits, batch)
    if smoothing == 0:
        return gold
    real = batch["attention_mask"].bool()
    uniform = torch.zeros((), device=gold.device)
    for logits in (out.start_logits, out.end_logits):
        log_probs = logits.float().masked_fill(~real, -1e9).log_softmax(-1)  # padding has no probability
        uniform = uniform - (log_probs.masked_fill(~real, 0).sum(-1) / real.sum(-1)).mean() / 2
    return (1 - smoothing) * gold + smoothing * uniform


def main(argv: list[str] | None = None) -> int:
    parser = config_parser(__doc__)
    parser.add_argument("--smoothing", type=probability, default=0.1, help="share of the target spread evenly")
    args = parser.parse_args(argv)
    setup_logging()
    summary = engine.fit(config_from_args(args), compute_loss=partial(smoothed_loss, smoothing=args.smoothing))
    if summary["final"]:
        print(json.dumps({"f1": summary["final"]["f1"], "steps": summary["steps"], "smoothing": args.smoothing}))
    return 0


if __name__ == "__main__":
    run(main)
