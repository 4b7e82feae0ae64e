"""Timing a model: how long forward passes take, and from a few of them how long a whole evaluation will.

Used to plan a run to a time budget (`bertqa.training.budget`) and to say before a long evaluation how long it
takes (`bertqa.training.evaluation`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

__all__ = ["evaluation_seconds", "time_forward"]


def evaluation_seconds(
    model: torch.nn.Module, loaders: Sequence[Any], *, device: torch.device, batch_size: int, multiple: int
) -> float:
    """One evaluation's seconds over `loaders` (`eval_batches` loaders: the evaluation data and the v2 threshold's),
    from forward passes over the longest, a middle and the shortest batch of each (after an untimed warm-up): the
    seconds per token at those three lengths, interpolated to every batch's length (a long window costs more per
    token: attention grows with the square of the length). About a tenth of an evaluation of 1000 SQuAD questions."""
    from bertqa.batching import SortedBatchSampler, model_inputs, padded_tokens

    total = 0.0
    for loader in loaders:
        dataset = loader.dataset
        batches = list(SortedBatchSampler(dataset.features.lengths, batch_size))
        tokens = padded_tokens(batches, dataset.features.lengths, multiple)
        lengths = tokens / np.array([len(b) for b in batches])  # each batch's padded length
        picks = sorted({0, len(batches) // 2, len(batches) - 1})  # the longest, a middle one, the shortest
        inputs = {k: model_inputs(loader.collate_fn([dataset[i] for i in batches[k]])) for k in picks}
        shortest = inputs[picks[-1]]  # the untimed warm-up before each: cheap
        per_token = [time_forward(model, [inputs[k]], device, warm_up=shortest) / tokens[k] for k in picks]
        order = np.argsort(lengths[picks])
        at = np.interp(lengths, lengths[picks][order], np.array(per_token)[order])
        total += float((tokens * at).sum())
    return total * 1.05  # post-processing and scoring: under 1% of the forward passes on SQuAD, plus the gathers


def time_forward(
    model: torch.nn.Module,
    batches: Sequence[dict[str, torch.Tensor]],
    device: torch.device,
    *,
    warm_up: dict[str, torch.Tensor] | None = None,
) -> float:
    """Seconds that a forward pass in eval mode takes over `batches` (model inputs only), after one untimed pass
    over `warm_up` (default: the first batch); the model's training mode is put back."""
    was_training = model.training
    model.eval()

    def run(batch: dict[str, torch.Tensor]) -> None:
        model(**{k: v.to(device) for k, v in batch.items()})

    with torch.no_grad():
        run(warm_up if warm_up is not None else batches[0])
        _sync(device)
        t0 = time.perf_counter()
        for batch in batches:
            run(batch)
        _sync(device)
        elapsed = time.perf_counter() - t0
    model.train(was_training)
    return elapsed


def _sync(device: torch.device) -> None:
    if device.type == "cuda":  # GPU work is queued: only a sync makes a clock reading mean the work is done
        torch.cuda.synchronize(device)
