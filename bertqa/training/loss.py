"""The training objective: `qa_loss` (start and end cross-entropy over a window's real tokens) and `default_loss`,
the model on a batch scored by it. A loss of your own (`fit(compute_loss=...)`, `bertqa.distill.Distillation`) is
built on `qa_loss`; `bertqa.engine` re-exports both."""

from __future__ import annotations

from collections.abc import Callable

import torch

from bertqa.batching import model_inputs

__all__ = ["Batch", "LossFn", "default_loss", "qa_loss"]

Batch = dict[str, torch.Tensor]
LossFn = Callable[[torch.nn.Module, Batch], torch.Tensor]


def qa_loss(start_logits: torch.Tensor, end_logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Mean of the start and end cross-entropy over the real tokens of each window, against the batch's labels.

    The models' built-in QA loss lets padding positions into the softmax, so the same window would get a different
    loss in a batch padded further; masking them makes the objective independent of how batches are padded.
    Pure: give it logits computed once (for a distillation or smoothing term beside it) and the batch they came from.
    """
    padding = batch["attention_mask"] == 0
    losses = [
        torch.nn.functional.cross_entropy(logits.float().masked_fill(padding, -1e9), batch[target])
        for logits, target in ((start_logits, "start_positions"), (end_logits, "end_positions"))
    ]
    return (losses[0] + losses[1]) / 2


def default_loss(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """The model on the batch's inputs (`model_inputs`: never the labels, or it computes its own unmasked loss),
    scored by `qa_loss`."""
    out = model(**model_inputs(batch))
    return qa_loss(out.start_logits, out.end_logits, batch)
