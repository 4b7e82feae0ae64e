"""Answering questions with a trained model: `Answerer` (load once, answer many), its `Answer`s, the settings saved
beside a model (`bertqa.json`), and the checks on questions that come from users.

Answers come from the same windows, logits loop (`bertqa.inference.predict_logits`) and exhaustive span search
(`bertqa.postprocess`) as evaluation, so what a deployed model answers is what was scored.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bertqa.data import NO_TOKENS, Example, NoTokensError, Window, tokenize_examples
from bertqa.deploy.backends import DEFAULT_SETTINGS, load_settings
from bertqa.inference import eval_batches, predict_logits
from bertqa.postprocess import Calibration, Prediction, postprocess
from bertqa.training.runtime import keep_freed_memory, resolve_precision

__all__ = ["DEFAULT_SETTINGS", "Answer", "Answerer", "answer_questions", "load_settings", "question_pairs"]


def answer_questions(
    model: torch.nn.Module,
    tokenizer: Any,
    items: Sequence[tuple[str, str]],
    *,
    settings: dict[str, Any] | None = None,
    batch_size: int = 64,
) -> list[Prediction]:
    """Answer (question, context) pairs with a model already loaded: one `Prediction` per pair, in order."""
    settings = {**DEFAULT_SETTINGS, **(settings or {})}
    examples = [Example(str(i), "", context, question, (), (), True) for i, (question, context) in enumerate(items)]
    features = tokenize_examples(examples, tokenizer, Window.from_dict(settings))
    loader = eval_batches(features, batch_size=batch_size, pad_token_id=tokenizer.pad_token_id)
    start, end = predict_logits(model, loader)
    preds = postprocess(examples, features, start, end, max_answer_length=settings["max_answer_length"])
    return [preds[ex.id] for ex in examples]


@dataclass(frozen=True)
class Answer:
    """One answer. `context[start:end] == answer`; `probability` is the softmax over the question's candidate spans
    and "no answer"; for v2 models `no_answer_probability` too. No answer: "" with start/end None."""

    id: Any
    answer: str
    start: int | None
    end: int | None
    score: float | None
    probability: float | None
    no_answer_probability: float | None = None
    top_k: tuple[dict[str, Any], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        if self.no_answer_probability is None:
            del out["no_answer_probability"]
        if not self.top_k:
            del out["top_k"]
        return out


class Answerer:
    """A trained model loaded once to answer many questions: batched, on a GPU when there is one, in bf16 where the
    hardware runs it natively (NVIDIA GPUs with bf16, CPUs with AMX or AVX512-BF16), with the window settings and
    no-answer threshold saved beside the model (`bertqa.json`). A folder written by `scripts/export.py` runs on
    ONNX Runtime instead (`bertqa.deploy.backends`), in the precision it was exported in, with the same windows, span
    search and threshold. A LoRA run's `adapter/` folder answers on the base model it names (or `base_model`).

    Any transformers question-answering model answers too, a folder saved by plain transformers or a hub id: with
    windows that fit it, as a SQuAD 1.1 model unless `v2=True` or a `threshold` makes "no answer" possible
    (`bertqa.deploy.settings`); the log says which. A model whose QA head was never trained is said loudly
    (`untrained_head` gives why; None otherwise).

        answerer = Answerer("runs/quick/final_model")
        answerer([{"question": "Who wrote it?", "context": "The book was written by Ann Lee in 1990."}])
        Answerer("deepset/roberta-base-squad2", v2=True)  # a SQuAD 2.0 model bertqa did not train
    """

    def __init__(
        self,
        model_dir: str | Path,
        *,
        device: str | None = None,
        precision: str = "auto",
        batch_size: int | None = None,
        threshold: float | None = None,
        base_model: str | None = None,
        v2: bool | None = None,
    ) -> None:
        from bertqa.deploy.backends import backend_name, is_exported, load_checked, precision_for
        from bertqa.deploy.settings import answer_settings
        from bertqa.model import build_tokenizer

        self.model_dir = str(model_dir)
        self.tokenizer = build_tokenizer(model_dir)
        self.settings, saved = answer_settings(model_dir, self.tokenizer, v2=v2, threshold=threshold)
        self.settings_from = "bertqa.json" if saved else "defaults (no bertqa.json)"
        precision = precision_for(model_dir, precision)
        exported = is_exported(model_dir)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() and not exported else "cpu"))
        self.model, self.untrained_head = load_checked(model_dir, device=self.device.type, base_model=base_model)
        if self.device.type == "cpu":
            keep_freed_memory()
        self.bf16 = resolve_precision(precision, device=self.device.type) == "bf16"
        self.backend = backend_name(model_dir, bf16=self.bf16)
        # Windows per forward pass. On a 2-core CPU small batches of windows of like length answer fastest: 4
        # answered 300 dev questions as fast as 16 (PyTorch) or 10% faster (ONNX int8), and the 12-32 questions
        # of a service's batch 1.2-1.4x faster; 64 was 1.4x slower than 16. GPUs want more.
        self.batch_size = batch_size or (64 if self.device.type == "cuda" else 4)
        # The version and threshold asked for are in the settings (`answer_settings`).
        self.v2 = bool(self.settings["v2"])
        self.threshold = self.settings["no_answer_threshold"] if self.v2 else None
        # Probabilities are given with the calibration chosen in training where the model's were off.
        self.calibration = Calibration.from_settings(self.settings)

    def __call__(
        self, questions: Sequence[Mapping[str, Any]], *, top_k: int = 0, places: Sequence[str] | None = None
    ) -> list[Answer]:
        """Answer `{"question", "context"[, "id"]}` records (ids are kept as given, else the position); with
        `top_k`, each answer also lists that many candidate spans, best first. A bad record is named by
        `places[i]` (say "q.jsonl: line 3"), else by its position and id."""
        pairs = question_pairs(questions, places)
        if not pairs:
            return []
        try:
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                preds = answer_questions(
                    self.model, self.tokenizer, pairs, settings=self.settings, batch_size=self.batch_size
                )
        except NoTokensError as err:  # the examples' ids are the records' positions
            i = int(err.example_id)
            place = places[i] if places is not None else f"question {i} (id {questions[i].get('id', i)!r})"
            raise ValueError(f"{place}: {err.field!r} {NO_TOKENS}") from None
        return [self._answer(q.get("id", i), p, top_k) for i, (q, p) in enumerate(zip(questions, preds))]

    def _answer(self, qid: Any, pred: Prediction, top_k: int) -> Answer:
        span_probs, null_prob = pred.probabilities(self.calibration)
        candidates = tuple(
            {"answer": s.text, "start": s.start, "end": s.end, "score": s.score, "probability": p}
            for s, p in zip(pred.spans()[:top_k], span_probs)
        )
        no_answer = self.v2 and pred.answer(self.threshold) == ""
        if no_answer or not pred.nbest:
            score = pred.null_score if no_answer else None
            probability = null_prob if no_answer else None
            return Answer(qid, "", None, None, score, probability, null_prob if self.v2 else None, candidates)
        best = pred.spans()[0]
        v2_null = null_prob if self.v2 else None
        return Answer(qid, best.text, best.start, best.end, best.score, span_probs[0], v2_null, candidates)


def question_pairs(
    questions: Sequence[Mapping[str, Any]], places: Sequence[str] | None = None
) -> list[tuple[str, str]]:
    """(question, context) of each record; a record that is not one, or lacks either as non-empty text, is named
    by `places[i]` (say "q.jsonl: line 3"), else by its position and id."""
    if isinstance(questions, (Mapping, str)):
        raise TypeError("pass a list of {'question': ..., 'context': ...} records (one record goes in a list too)")
    pairs = []
    for i, record in enumerate(questions):
        if not isinstance(record, Mapping):
            raise TypeError(
                f"question {i}: expected a record with 'question' and 'context', got {type(record).__name__}"
            )
        for key in ("question", "context"):
            if not isinstance(record.get(key), str) or not record[key].strip():
                problem = "is missing" if key not in record else "must be non-empty text"
                place = places[i] if places is not None else f"question {i} (id {record.get('id', i)!r})"
                raise ValueError(f"{place}: {key!r} {problem}")
        pairs.append((record["question"], record["context"]))
    return pairs
