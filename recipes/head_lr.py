"""Recipe: an optimizer of your own through `fit`, here AdamW with a higher learning rate for the QA head.

The head is the one part of the model that starts from random weights, so it can take larger steps than the
pretrained encoder below it. `fit(config, optimizer=factory)` calls `factory(model)` once for the optimizer; the
warmup and decay stay bertqa's, counted in updates and applied to each group's own peak, and a resumed run gets this
run's peaks back (not the checkpoint's). `bertqa.training.optim.layer_depths` tells which parameters are the head
for BERT, RoBERTa, ELECTRA, DeBERTa and DistilBERT. Every flag of train.py works here.

  python recipes/head_lr.py --preset quick --head-lr-multiplier 10 --output-dir runs/quick-head-lr
"""

from __future__ import annotations

import json
from functools import partial

import torch

from bertqa import engine
from bertqa.cli import config_from_args, config_parser, positive_float, run, setup_logging
from bertqa.training import optim


def head_boosted_adamw(
    model: torch.nn.Module, *, lr: float, weight_decay: float, multiplier: float
) -> torch.optim.Optimizer:
    """AdamW at `lr` for the encoder and `lr * multiplier` for the QA head; biases and LayerNorm weights are not
    decayed, as in bertqa's own optimizer."""
    depths = optim.layer_depths(model)
    head = max(depths.values())
    groups = []
    for name, scale, in_group in (("encoder", 1.0, lambda d: d < head), ("head", multiplier, lambda d: d == head)):
        params = [(n, p) for n, p in model.named_parameters() if p.requires_grad and in_group(depths[n])]
        for decay in (True, False):
            chosen = [p for _, p in params if (p.dim() >= 2) == decay]
            groups.append(
                {"params": chosen, "lr": lr * scale, "name": name, "weight_decay": weight_decay if decay else 0.0}
            )
    return torch.optim.AdamW(groups, lr=lr)


def main(argv: list[str] | None = None) -> int:
    parser = config_parser(__doc__)
    parser.add_argument("--head-lr-multiplier", type=positive_float, default=10.0, help="the head's LR over --lr")
    args = parser.parse_args(argv)
    setup_logging()
    config = config_from_args(args)
    factory = partial(
        head_boosted_adamw, lr=config.lr, weight_decay=config.weight_decay, multiplier=args.head_lr_multiplier
    )
    summary = engine.fit(config, optimizer=factory)
    if summary["final"]:
        print(
            json.dumps(
                {
                    "f1": summary["final"]["f1"],
                    "steps": summary["steps"],
                    "head_lr": config.lr * args.head_lr_multiplier,
                }
            )
        )
    return 0


if __name__ == "__main__":
    run(main)
