"""Run a model on windows: the one logits loop (one process or many) and evaluation against gold answers.

Training-time evaluation (`bertqa.engine`), the evaluation script and serving (`bertqa.deploy.serving`) all come through
`predict_logits`, so there is a single loop from windows to logits; `evaluate` post-processes and scores them once.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from bertqa.batching import eval_loader, model_inputs
from bertqa.data import Example, Features
from bertqa.postprocess import Prediction, postprocess, score

if TYPE_CHECKING:
    from accelerate import Accelerator

__all__ = ["eval_batches", "evaluate", "predict_logits", "progress_bars"]


def eval_batches(
    features: Features,
    *,
    batch_size: int,
    pad_token_id: int,
    pad_to_multiple_of: int = 8,
    accelerator: Accelerator | None = None,
) -> torch.utils.data.DataLoader:
    """Length-sorted evaluation batches of `features`; with an `accelerator`, each process gets its share."""
    on_gpu = accelerator.device.type == "cuda" if accelerator is not None else torch.cuda.is_available()
    loader = eval_loader(
        features,
        batch_size=batch_size,
        pad_token_id=pad_token_id,
        pad_to_multiple_of=pad_to_multiple_of,
        pin_memory=on_gpu,
    )
    if accelerator is None:
        return loader
    # The module-level function, not accelerator.prepare: a prepared loader would be registered for checkpointing.
    from accelerate.data_loader import prepare_data_loader

    return prepare_data_loader(
        loader,
        accelerator.device,
        num_processes=accelerator.num_processes,
        process_index=accelerator.process_index,
        put_on_device=True,
        non_blocking=on_gpu,
    )


def progress_bars() -> bool:
    """Whether progress bars are drawn: on a terminal or in a notebook, unless TQDM_DISABLE is set (the usual
    switch). Written to a file (`2> log`) a bar is a stream of carriage returns; the training log's lines say how far
    a run is instead."""
    if os.environ.get("TQDM_DISABLE", "").strip().lower() not in ("", "0", "false", "no"):
        return False
    return "ipykernel" in sys.modules or sys.stderr.isatty()


@torch.no_grad()
def predict_logits(
    model: torch.nn.Module,
    loader: torch.utils.data.DataLoader,
    *,
    accelerator: Accelerator | None = None,
    progress: bool | str = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Start/end logits of every window of an `eval_batches` loader, in the order of its features.

    Without an `accelerator` the loop runs in this process on the model's device. With one, each process runs its
    share and the rows are gathered with their feature indices and written to their index, so the duplicates that
    uneven sharding adds fall away; every process gets the whole result. `progress` shows a bar (main process, where
    `progress_bars()` allows), named "eval" or the text given.
    """
    from tqdm.auto import tqdm

    features: Features = loader.dataset.features
    device = accelerator.device if accelerator is not None else _device_of(model)
    width = int(features.lengths.max())
    logits_out = np.full((2, len(features), width), -1e4, dtype=np.float32)
    was_training = model.training
    model.eval()
    main = accelerator is None or accelerator.is_main_process
    name = progress if isinstance(progress, str) else "eval"
    shown = bool(progress) and main and progress_bars()
    for batch in tqdm(loader, desc=name, unit="batch", leave=False, disable=not shown):
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        out = model(**model_inputs(batch))
        # One width for every batch so they can be gathered across processes (a negative pad crops the
        # multiple-of-8 padding that can reach past the longest window).
        logits = torch.stack([out.start_logits, out.end_logits], dim=1).float()
        logits = torch.nn.functional.pad(logits, (0, width - logits.shape[-1]), value=-1e4)
        index = batch["feature_index"]
        if accelerator is not None:
            logits = accelerator.pad_across_processes(logits, dim=0)
            index = accelerator.pad_across_processes(index, dim=0, pad_index=-1)
            logits, index = accelerator.gather((logits, index))
        keep = (index >= 0).cpu().numpy()
        logits_out[:, index.cpu().numpy()[keep]] = logits.cpu().numpy()[keep].transpose(1, 0, 2)
    model.train(was_training)
    return logits_out[0], logits_out[1]


def _device_of(model: torch.nn.Module) -> torch.device:
    """Where a model's inputs go: its parameters' device, or the `device` it names (an exported model has no
    parameters; see `bertqa.deploy.backends.OnnxQAModel`)."""
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device(getattr(model, "device", "cpu"))


def evaluate(
    accelerator: Accelerator,
    model: torch.nn.Module,
    loader: torch.utils.data.DataLoader,
    examples: Sequence[Example],
    *,
    v2: bool,
    max_answer_length: int = 30,
    threshold: float = 0.0,
    progress: bool | str = False,
) -> tuple[dict[str, float], dict[str, Prediction]]:
    """Predict every window, post-process and score once on the main process, and share the metrics with all.

    Returns (metrics, predictions): metrics on every process, predictions on the main one (empty elsewhere).
    """
    from accelerate.utils import broadcast_object_list

    t0 = time.perf_counter()
    start, end = predict_logits(model, loader, accelerator=accelerator, progress=progress)
    t1 = time.perf_counter()
    metrics: dict[str, float] = {}
    predictions: dict[str, Prediction] = {}
    if accelerator.is_main_process:
        features = loader.dataset.features
        predictions = postprocess(examples, features, start, end, max_answer_length=max_answer_length)
        metrics = score(examples, predictions, v2=v2, threshold=threshold)
        metrics.update(eval_predict_s=t1 - t0, eval_postprocess_s=time.perf_counter() - t1)
    return broadcast_object_list([metrics])[0], predictions
