"""Run a model on windows: the one logits loop (one process or many), evaluation, and using a trained model.

Training-time evaluation (`bertqa.engine`) and the scripts that use a saved model both come through here, so there is
a single loop from windows to logits to answers. `bertqa.json`, saved next to a model by training, holds the window
settings and the no-answer threshold it was trained with.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from bertqa.batching import eval_loader, model_inputs
from bertqa.data import Example, Features, Window, is_v2, tokenize_examples
from bertqa.postprocess import Prediction, postprocess, score

if TYPE_CHECKING:
    from accelerate import Accelerator

logger = logging.getLogger("bertqa")

__all__ = [
    "DEFAULT_SETTINGS",
    "answer_questions",
    "eval_batches",
    "evaluate",
    "evaluate_model",
    "load_settings",
    "make_accelerator",
    "predict_logits",
    "resolve_precision",
]

# What a model folder without bertqa.json (e.g. a plain hub checkpoint) is used with.
DEFAULT_SETTINGS: dict[str, Any] = {
    **Window().to_dict(),
    "max_answer_length": 30,
    "v2": False,
    "no_answer_threshold": None,
}


def resolve_precision(mode: str) -> str:
    """ "auto" -> bf16 on GPUs that support it, otherwise full precision (fp16 only when asked for)."""
    if mode != "auto":
        return mode
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def make_accelerator(*, timeout_s: float = 1800, **kwargs: Any) -> Accelerator:
    """An Accelerator; several processes without a GPU (torchrun, `accelerate launch --multi_gpu` on a CPU machine)
    become CPU data parallelism over gloo instead of silently running as independent single processes.

    A collective that waits more than `timeout_s` seconds for another process (one that stalled or died) fails
    instead of hanging forever.
    """
    from datetime import timedelta

    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    multi_process = int(os.environ.get("WORLD_SIZE", "1")) > 1
    timeout = InitProcessGroupKwargs(timeout=timedelta(seconds=timeout_s))
    return Accelerator(cpu=multi_process and not torch.cuda.is_available(), kwargs_handlers=[timeout], **kwargs)


def eval_batches(
    features: Features,
    *,
    batch_size: int,
    pad_token_id: int,
    pad_to_multiple_of: int = 8,
    accelerator: Accelerator | None = None,
) -> torch.utils.data.DataLoader:
    """Length-sorted evaluation batches of `features`; with an `accelerator`, each process gets its share."""
    loader = eval_loader(
        features, batch_size=batch_size, pad_token_id=pad_token_id, pad_to_multiple_of=pad_to_multiple_of
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
    )


@torch.no_grad()
def predict_logits(
    model: torch.nn.Module, loader: torch.utils.data.DataLoader, *, accelerator: Accelerator | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Start/end logits of every window of an `eval_batches` loader, in the order of its features.

    Without an `accelerator` the loop runs in this process on the model's device. With one, each process runs its
    share and the rows are gathered with their feature indices and written to their index, so the duplicates that
    uneven sharding adds fall away; every process gets the whole result.
    """
    features: Features = loader.dataset.features
    device = accelerator.device if accelerator is not None else next(model.parameters()).device
    width = int(features.lengths.max())
    logits_out = np.full((2, len(features), width), -1e4, dtype=np.float32)
    was_training = model.training
    model.eval()
    for batch in loader:
        batch = {k: v.to(device) for k, v in batch.items()}
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


def evaluate(
    accelerator: Accelerator,
    model: torch.nn.Module,
    loader: torch.utils.data.DataLoader,
    examples: Sequence[Example],
    *,
    v2: bool,
    max_answer_length: int = 30,
    threshold: float = 0.0,
) -> tuple[dict[str, float], dict[str, Prediction]]:
    """Predict every window, post-process and score once on the main process, and share the metrics with all.

    Returns (metrics, predictions): metrics on every process, predictions on the main one (empty elsewhere).
    """
    import time

    from accelerate.utils import broadcast_object_list

    t0 = time.perf_counter()
    start, end = predict_logits(model, loader, accelerator=accelerator)
    t1 = time.perf_counter()
    metrics: dict[str, float] = {}
    predictions: dict[str, Prediction] = {}
    if accelerator.is_main_process:
        features = loader.dataset.features
        predictions = postprocess(examples, features, start, end, max_answer_length=max_answer_length)
        metrics = score(examples, predictions, v2=v2, threshold=threshold)
        metrics.update(eval_predict_s=t1 - t0, eval_postprocess_s=time.perf_counter() - t1)
    return broadcast_object_list([metrics])[0], predictions


def load_settings(model_dir: str | Path) -> dict[str, Any]:
    """The window settings and no-answer threshold saved next to a model by training, else the defaults."""
    path = Path(model_dir) / "bertqa.json"
    saved = json.loads(path.read_text()) if path.is_file() else {}
    return {**DEFAULT_SETTINGS, **{k: v for k, v in saved.items() if k in DEFAULT_SETTINGS}}


def answer_questions(
    model: torch.nn.Module,
    tokenizer: Any,
    items: Sequence[tuple[str, str]],
    *,
    settings: dict[str, Any] | None = None,
    batch_size: int = 64,
) -> list[Prediction]:
    """Answer (question, context) pairs. Use `Prediction.answer(threshold)` for v2 models' "no answer"."""
    settings = {**DEFAULT_SETTINGS, **(settings or {})}
    examples = [Example(str(i), "", context, question, (), (), True) for i, (question, context) in enumerate(items)]
    features = tokenize_examples(examples, tokenizer, Window.from_dict(settings))
    loader = eval_batches(features, batch_size=batch_size, pad_token_id=tokenizer.pad_token_id)
    start, end = predict_logits(model, loader)
    preds = postprocess(examples, features, start, end, max_answer_length=settings["max_answer_length"])
    return [preds[ex.id] for ex in examples]


def evaluate_model(
    model_dir: str,
    eval_data: str,
    *,
    answerable_only: bool = False,
    max_examples: int | None = None,
    seed: int = 42,
    batch_size: int = 64,
    threshold: float | None = None,
    mixed_precision: str = "auto",
    column_map: str | None = None,
) -> tuple[dict[str, float], dict[str, Prediction], list[Example]]:
    """Score a saved model on a dataset with the settings it was trained with; works under `accelerate launch`.

    For v2 data the no-answer threshold is `threshold`, else the one saved with the model, else 0.
    Returns (metrics, predictions, examples); metrics on every process, predictions on the main one.
    """
    from bertqa.data import load_examples
    from bertqa.model import build_model, build_tokenizer

    accelerator = make_accelerator(mixed_precision=resolve_precision(mixed_precision))
    settings = load_settings(model_dir)
    tokenizer = build_tokenizer(model_dir)
    examples, report = load_examples(
        eval_data, answerable=answerable_only, max_examples=max_examples, seed=seed, column_map=column_map
    )
    logger.info("loaded %s", report.format())
    features = tokenize_examples(examples, tokenizer, Window.from_dict(settings))
    model = accelerator.prepare(build_model(model_dir))
    v2 = is_v2(examples)
    logger.info(
        "evaluating %d examples (%d windows, %s) on %d processes",
        *(len(examples), len(features), "v2.0" if v2 else "v1.1", accelerator.num_processes),
    )
    if threshold is None:
        threshold = settings["no_answer_threshold"] or 0.0
    loader = eval_batches(features, batch_size=batch_size, pad_token_id=tokenizer.pad_token_id, accelerator=accelerator)
    metrics, predictions = evaluate(
        accelerator, model, loader, examples, v2=v2, max_answer_length=settings["max_answer_length"],
        threshold=threshold,
    )  # fmt: skip
    metrics["no_answer_threshold"] = threshold if v2 else None
    return metrics, predictions, examples
