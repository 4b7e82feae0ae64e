"""Use a trained model: answer questions, score it on a dataset, read its training settings (`bertqa.json`)."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bertqa.batching import eval_loader
from bertqa.data import Example, Features, tokenize_examples
from bertqa.postprocess import Prediction, postprocess

logger = logging.getLogger("bertqa")

__all__ = [
    "DEFAULT_SETTINGS",
    "answer_questions",
    "evaluate_model",
    "load_settings",
    "logits_for",
    "windows_with",
]

# What a model folder without bertqa.json (e.g. a plain hub checkpoint) is used with.
DEFAULT_SETTINGS: dict[str, Any] = {
    "max_seq_length": 384,
    "doc_stride": 128,
    "max_query_length": 64,
    "max_answer_length": 30,
    "v2": False,
    "no_answer_threshold": None,
}


def load_settings(model_dir: str | Path) -> dict[str, Any]:
    """The window settings and no-answer threshold saved next to a model by training, else the defaults."""
    path = Path(model_dir) / "bertqa.json"
    saved = json.loads(path.read_text()) if path.is_file() else {}
    return {**DEFAULT_SETTINGS, **{k: v for k, v in saved.items() if k in DEFAULT_SETTINGS}}


def windows_with(settings: dict[str, Any], examples: Sequence[Example], tokenizer: Any) -> Features:
    """Tokenize examples with the window settings a model was trained with."""
    keys = ("max_seq_length", "doc_stride", "max_query_length")
    return tokenize_examples(examples, tokenizer, **{k: settings[k] for k in keys})


@torch.no_grad()
def logits_for(
    model: torch.nn.Module, features: Features, *, pad_token_id: int, batch_size: int = 64
) -> tuple[np.ndarray, np.ndarray]:
    """Start/end logits of every window on the model's device, one process, longest batches first."""
    loader = eval_loader(features, batch_size=batch_size, pad_token_id=pad_token_id)
    device = next(model.parameters()).device
    width = int(features.lengths.max())
    start = np.full((len(features), width), -1e4, dtype=np.float32)
    end = np.full_like(start, -1e4)
    model.eval()
    for batch in loader:
        index = batch.pop("feature_index").numpy()
        out = model(**{k: v.to(device) for k, v in batch.items()})
        n = min(width, out.start_logits.shape[1])  # batches are padded up to a multiple of 8, maybe past `width`
        start[index, :n] = out.start_logits[:, :n].float().cpu().numpy()
        end[index, :n] = out.end_logits[:, :n].float().cpu().numpy()
    return start, end


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
    features = windows_with(settings, examples, tokenizer)
    start, end = logits_for(model, features, pad_token_id=tokenizer.pad_token_id, batch_size=batch_size)
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
) -> tuple[dict[str, float], dict[str, Prediction], list[Example]]:
    """Score a saved model on a dataset with the settings it was trained with; works under `accelerate launch`.

    For v2 data the no-answer threshold is `threshold`, else the one saved with the model, else 0.
    Returns (metrics, predictions, examples); metrics on every process, predictions on the main one.
    """
    from bertqa.data import load_examples
    from bertqa.engine import evaluate, make_accelerator, resolve_precision
    from bertqa.model import build_model, build_tokenizer

    accelerator = make_accelerator(mixed_precision=resolve_precision(mixed_precision))
    settings = load_settings(model_dir)
    tokenizer = build_tokenizer(model_dir)
    examples, _ = load_examples(eval_data, answerable=answerable_only, max_examples=max_examples, seed=seed)
    features = windows_with(settings, examples, tokenizer)
    model = accelerator.prepare(build_model(model_dir))
    v2 = any(ex.is_impossible for ex in examples)
    logger.info(
        "evaluating %d examples (%d windows, %s) on %d processes",
        len(examples),
        len(features),
        "v2.0" if v2 else "v1.1",
        accelerator.num_processes,
    )
    if threshold is None:
        threshold = settings["no_answer_threshold"] or 0.0
    metrics, predictions = evaluate(
        accelerator,
        model,
        examples,
        features,
        v2=v2,
        batch_size=batch_size,
        pad_token_id=tokenizer.pad_token_id,
        max_answer_length=settings["max_answer_length"],
        threshold=threshold,
    )
    metrics["no_answer_threshold"] = threshold if v2 else None
    return metrics, predictions, examples
