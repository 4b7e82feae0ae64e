"""Post-processing: start/end logits of every window -> the best answer span of every example.

The span search is vectorised with numpy: for each window it scores every (start, end) pair with
start <= end < start + max_answer_length inside the context in one array operation, so a whole dev set takes about
a second instead of a Python loop over windows. A real no-answer score is kept per example for SQuAD v2:
(best CLS score over its windows, taken as the minimum as in the original BERT code) minus the best span score.
`score` turns the predictions into the official EM/F1.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from bertqa.data import Example, Features
from bertqa.metrics import (
    calibration_bins,
    expected_calibration_error,
    question_scores,
    squad_v1_scores,
    squad_v2_scores,
)

__all__ = [
    "ERROR_KINDS",
    "MAX_CALIBRATION_ERROR",
    "NO_ANSWER_SCALES",
    "NO_ANSWER_SHIFTS",
    "NO_CALIBRATION",
    "STATED",
    "TEMPERATURES",
    "Calibration",
    "Prediction",
    "Span",
    "best_spans",
    "confidence",
    "error_summary",
    "fit_calibration",
    "pad_offsets",
    "postprocess",
    "question_report",
    "score",
]


class Span(NamedTuple):
    """A candidate answer: its text, score (start + end logit) and [start, end) characters in the context."""

    text: str
    score: float
    start: int
    end: int


@dataclass(frozen=True)
class Prediction:
    """The answer for one example. `no_answer_score` > threshold means "no answer" (for v2 models).

    `nbest` holds the best candidate spans, best first, as plain (text, score, start, end) tuples (a dev set has
    hundreds of thousands; `spans()` gives them as `Span`s). It is empty when the context has no span at all, e.g.
    a context the tokenizer turns into no tokens; `span_score` is then -inf.
    """

    text: str
    span_score: float
    null_score: float
    no_answer_score: float
    nbest: tuple[tuple[str, float, int, int], ...] = ()
    # A span that several overlapping windows propose is listed once, ranked by its best window's score; here, per
    # `nbest` span, the log-sum-exp of its scores over those windows, so that its probability is the sum of theirs
    # (empty when no span was proposed twice: the scores themselves).
    pooled_scores: tuple[float, ...] = ()

    def spans(self) -> tuple[Span, ...]:
        return tuple(map(Span._make, self.nbest))

    def answer(self, threshold: float | None) -> str:
        """The span text, or "" when a threshold is given and the no-answer score is above it."""
        return "" if threshold is not None and self.no_answer_score > threshold else self.text

    def probabilities(self, calibration: Calibration | None = None) -> tuple[list[float], float]:
        """(the probability of each `nbest` span, of "no answer"). Uncalibrated, a softmax over the candidate spans'
        scores and the null score. A `Calibration` sets the no-answer probability from the no-answer log-odds and
        spreads what is left over the spans by a softmax of their scores divided by its temperature; neither
        changes the order of the candidates, so no answer changes with it.

        A span proposed by several windows gets the sum of their probabilities (see `pooled_scores`; at a
        temperature other than 1 their pooled score is divided, a close stand-in for pooling the divided ones)."""
        c = calibration or NO_CALIBRATION
        spans = np.array(self.pooled_scores or [s[1] for s in self.nbest], dtype=np.float64)
        if not len(spans):
            return [], 1.0
        top = spans.max()
        log_odds = self.null_score - (top + math.log(np.exp(spans - top).sum()))  # "no answer" against the spans
        null = _sigmoid(c.no_answer_scale * log_odds + c.no_answer_shift)
        weights = np.exp((spans - top) / c.temperature)
        return ((1.0 - null) * weights / weights.sum()).tolist(), null


@dataclass(frozen=True)
class Calibration:
    """How a model's scores become probabilities that mean what they say, fitted on held-out questions
    (`fit_calibration`; the defaults change nothing). The no-answer probability is sigmoid(`no_answer_scale` x z +
    `no_answer_shift`), z being the log-odds of "no answer" against all the spans, and the spans share the rest by a
    softmax of their scores divided by `temperature`. Saved in `bertqa.json` under these three names."""

    temperature: float = 1.0
    no_answer_scale: float = 1.0
    no_answer_shift: float = 0.0

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> Calibration:
        """The calibration saved with a model (`bertqa.json`); none where it records none."""
        return cls(**{f.name: float(settings.get(f.name, f.default)) for f in dataclasses.fields(cls)})

    def to_settings(self) -> dict[str, float]:
        return dataclasses.asdict(self)


NO_CALIBRATION = Calibration()


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def pad_offsets(features: Features, length: int) -> np.ndarray:
    """Stack the per-window offsets into one (n_windows, length, 2) array, -1 past each window's end."""
    out = np.full((len(features), length, 2), -1, dtype=np.int32)
    # A slice copy per window: faster here than one scatter of every token (measured: 0.014 s vs 0.054 s, v2 dev).
    bounds, offsets = features.bounds.tolist(), features.token_offsets
    for i in range(len(features)):
        n = min(bounds[i + 1] - bounds[i], length)
        out[i, :n] = offsets[bounds[i] : bounds[i] + n]
    return out


def best_spans(
    start_logits: np.ndarray, end_logits: np.ndarray, offsets: np.ndarray, *, max_answer_length: int, n_best: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top `n_best` spans of each window (one per start token): scores, start and end tokens, each (n, k), best first.

    Only tokens inside the context (offset >= 0) may start or end a span; a window with no valid span gets -inf.
    """
    n, length = start_logits.shape
    width = min(max_answer_length, length)
    valid = offsets[:, :, 0] >= 0
    start = np.where(valid, start_logits, -np.inf).astype(np.float32)
    end = np.where(valid, end_logits, -np.inf).astype(np.float32)
    # shifted[:, i, k] = end logit of token i + k: every allowed span length as a strided view (no copy) of the end
    # logits padded with -inf, so spans running past the window end never win.
    padded = np.concatenate([end, np.full((n, width - 1), -np.inf, dtype=np.float32)], axis=1)
    shifted = np.lib.stride_tricks.sliding_window_view(padded, width, axis=1)
    # Best end for every start first: the top-k search then runs over `length` candidates, not length x width
    # (that search was most of the time). The best span is exact; the n-best list holds distinct starts.
    spans = shifted + start[:, :, None]
    best_len = np.argmax(spans, axis=2)
    per_start = np.take_along_axis(spans, best_len[:, :, None], axis=2)[:, :, 0]
    k = min(n_best, length)
    top = np.argpartition(-per_start, k - 1, axis=1)[:, :k]
    top_scores = np.take_along_axis(per_start, top, axis=1)
    order = np.argsort(-top_scores, axis=1, kind="stable")
    starts = np.take_along_axis(top, order, axis=1)
    top_scores = np.take_along_axis(top_scores, order, axis=1)
    return top_scores, starts, starts + np.take_along_axis(best_len, starts, axis=1)


def postprocess(
    examples: Sequence[Example],
    features: Features,
    start_logits: np.ndarray,
    end_logits: np.ndarray,
    *,
    max_answer_length: int = 30,
    n_best: int = 20,
    chunk_size: int = 256,
) -> dict[str, Prediction]:
    """The best span of every example over all its windows, with its no-answer score and n-best list.

    `start_logits`/`end_logits` are (n_windows, length) arrays in the order of `features` (padding past a window's
    end is ignored). Examples without any window are left out.
    """
    n, length = start_logits.shape
    if n != len(features):
        raise ValueError(f"got logits for {n} windows but {len(features)} features")
    scores = np.empty((n, n_best), dtype=np.float32)
    tok_start = np.zeros((n, n_best), dtype=np.int64)
    tok_end = np.zeros((n, n_best), dtype=np.int64)
    offsets = pad_offsets(features, length)
    for lo in range(0, n, chunk_size):
        hi = min(n, lo + chunk_size)
        s, a, b = best_spans(
            start_logits[lo:hi], end_logits[lo:hi], offsets[lo:hi], max_answer_length=max_answer_length, n_best=n_best
        )
        k = s.shape[1]
        scores[lo:hi], tok_start[lo:hi], tok_end[lo:hi] = -np.inf, 0, 0
        scores[lo:hi, :k], tok_start[lo:hi, :k], tok_end[lo:hi, :k] = s, a, b
    rows = np.arange(n)
    null = start_logits[rows, features.cls_index] + end_logits[rows, features.cls_index]
    return _per_example(examples, features, offsets, scores, tok_start, tok_end, null, n_best)


def _per_example(
    examples: Sequence[Example],
    features: Features,
    offsets: np.ndarray,
    scores: np.ndarray,
    tok_start: np.ndarray,
    tok_end: np.ndarray,
    null: np.ndarray,
    n_best: int,
) -> dict[str, Prediction]:
    """Merge window candidates into one prediction per example (windows of one example are contiguous or not).

    Everything that can be is done on whole arrays first (character spans, the minimum null score per example);
    the loop then only reads plain Python lists, which is several times faster than indexing numpy scalars.
    """
    rows = np.arange(len(scores))[:, None]
    char_start = offsets[rows, tok_start, 0]
    char_end = offsets[rows, tok_end, 1]
    order = np.argsort(features.example_index, kind="stable")
    firsts = np.concatenate([[0], np.flatnonzero(np.diff(features.example_index[order])) + 1]).astype(np.int64)
    group_null = np.minimum.reduceat(null[order], firsts) if len(order) else np.empty(0)
    out: dict[str, Prediction] = {}
    for group, null_score in zip(np.split(order, firsts[1:]), group_null.tolist()):
        ex = examples[features.example_index[group[0]]]
        if len(group) == 1:  # most examples: the window's candidates are already sorted, best first
            cands = zip(scores[group[0]].tolist(), char_start[group[0]].tolist(), char_end[group[0]].tolist())
        else:  # every candidate of every window, best first: overlapping windows may propose the same span
            flat = scores[group].ravel()
            top = np.argsort(-flat, kind="stable")
            cands = zip(
                flat[top].tolist(), char_start[group].ravel()[top].tolist(), char_end[group].ravel()[top].tolist()
            )
        nbest, pooled = _distinct_spans(cands, ex.context, n_best)
        best_text, best_score = nbest[0][:2] if nbest else ("", -math.inf)
        out[ex.id] = Prediction(
            text=best_text,
            span_score=best_score,
            null_score=null_score,
            no_answer_score=null_score - best_score,
            nbest=nbest,
            pooled_scores=pooled,
        )
    return out


def _distinct_spans(
    cands: Iterable[tuple[float, int, int]], context: str, n_best: int
) -> tuple[tuple[tuple[str, float, int, int], ...], tuple[float, ...]]:
    """The first `n_best` distinct character spans of candidates sorted best first, and each one's log-sum-exp
    score over all its occurrences (`()` when every span occurred once)."""
    nbest: list[tuple[str, float, int, int]] = []
    pooled: list[float] = []
    index: dict[tuple[int, int], int] = {}
    for score, a, b in cands:
        if score == -math.inf:  # sorted: no valid span follows
            break
        i = index.get((a, b))
        if i is not None:
            pooled[i] = float(np.logaddexp(pooled[i], score))
        elif len(nbest) < n_best:
            index[a, b] = len(nbest)
            nbest.append((context[a:b], score, a, b))
            pooled.append(score)
    merged = any(p != n[1] for p, n in zip(pooled, nbest))
    return tuple(nbest), tuple(pooled) if merged else ()


def score(
    examples: Sequence[Example], predictions: dict[str, Prediction], *, v2: bool, threshold: float = 0.0
) -> dict[str, float]:
    """Official EM/F1 for the examples. v2: spans vs no-answer at `threshold`, plus the best-threshold search.

    Every example counts, as in the official scripts: one without a prediction scores 0 in v1 and is taken as
    answered "no answer" in v2.
    """
    golds = {ex.id: list(ex.answer_texts) for ex in examples}
    spans = {q: p.text for q, p in predictions.items()}
    if not v2:
        return squad_v1_scores(spans, golds)
    na = {q: p.no_answer_score for q, p in predictions.items()}
    return squad_v2_scores(spans, golds, na, threshold=threshold)


# What went wrong with a question, in the order a summary lists them.
ERROR_KINDS = {
    "no_answer_given": "said 'no answer' to a question that has one",
    "answered_unanswerable": "answered a question that has none",
    "wrong_span": "answered with a span that shares no word with the answer",
    "partial_overlap": "answered with a span that shares some words with the answer",
    "right": "exactly right",
}


def question_report(
    examples: Sequence[Example],
    predictions: dict[str, Prediction],
    *,
    v2: bool,
    threshold: float | None,
    calibration: Calibration | None = None,
) -> list[dict[str, object]]:
    """One record per question, worst first (lowest F1, then the most confident): its question, gold answers,
    prediction, the prediction's probability, EM and F1 (0 to 1), what kind of result it is (`ERROR_KINDS`), and for
    v2 the no-answer score and probability. The answer is the one scored: "" where the no-answer score is above
    `threshold` (v2). Probabilities are given with `calibration` (the one saved with the model)."""
    rows = []
    for ex in examples:
        pred = predictions.get(ex.id)
        answer = "" if pred is None else pred.answer(threshold if v2 else None)
        em, f1 = question_scores(answer, ex.answer_texts, v2=v2)
        row: dict[str, object] = {"id": ex.id, "question": ex.question, "gold": list(ex.answer_texts)}
        spans, null = pred.probabilities(calibration) if pred is not None else ([], None)
        probability = null if answer == "" else spans[0] if spans else None  # of the answer given
        row |= {"prediction": answer, "probability": probability, "exact": em, "f1": f1}
        row["kind"] = _kind(answer, bool(ex.answer_texts), em, f1, v2=v2)
        if v2 and pred is not None:
            row |= {"no_answer_score": pred.no_answer_score, "no_answer_probability": null}
        rows.append(row)
    return sorted(rows, key=lambda r: (r["f1"], -(r["probability"] or 0.0), str(r["id"])))


def _kind(answer: str, has_answer: bool, em: float, f1: float, *, v2: bool) -> str:
    if v2 and has_answer and answer == "":
        return "no_answer_given"
    if v2 and not has_answer:
        return "right" if answer == "" else "answered_unanswerable"
    if em == 1.0:
        return "right"
    return "partial_overlap" if f1 > 0 else "wrong_span"


def error_summary(rows: Sequence[dict[str, object]]) -> dict[str, int]:
    """How many questions of `question_report` are of each kind, every kind listed."""
    counts = dict.fromkeys(ERROR_KINDS, 0)
    for row in rows:
        counts[str(row["kind"])] += 1
    return counts


# What each probability of an answer states, as the chance of what.
STATED = {
    "probability": "the answer given is exactly right",
    "no_answer_probability": "the question has no answer",
}


def confidence(rows: Sequence[dict[str, object]], *, bins: int = 10) -> dict[str, dict[str, object]]:
    """How far each probability of a `question_report` can be trusted: per probability (`STATED`), its expected
    calibration error over `bins` bins, the bins themselves, and how many questions stated it."""
    outcomes = {
        "probability": lambda row: row["exact"] == 1.0,
        "no_answer_probability": lambda row: not row["gold"],
    }
    out: dict[str, dict[str, object]] = {}
    for name, came_true in outcomes.items():
        stated = [row for row in rows if row.get(name) is not None]
        if not stated:
            continue
        table = calibration_bins([float(row[name]) for row in stated], [came_true(row) for row in stated], bins=bins)
        out[name] = {"ece": expected_calibration_error(table), "questions": len(stated), "bins": table}
    return out


# The temperatures `fit_calibration` chooses from: 1/10 to 10, each about 7% above the one before, 1 among them; and
# the no-answer scales (the same range, about 8% apart, 1 among them) and shifts (-5 to 5 by 0.1).
TEMPERATURES = tuple(float(t) for t in np.geomspace(0.1, 10.0, 71))
NO_ANSWER_SCALES = tuple(float(t) for t in np.geomspace(0.1, 10.0, 61))
NO_ANSWER_SHIFTS = tuple(float(t) for t in np.linspace(-5.0, 5.0, 101))
# Above this expected calibration error (on held-out questions) a run fits a calibration to its probabilities.
MAX_CALIBRATION_ERROR = 0.05


def fit_calibration(rows: Sequence[dict[str, object]], predictions: dict[str, Prediction]) -> Calibration:
    """The calibration under which the probabilities of `question_report` rows (uncalibrated) best state what came
    true on their questions (`predictions`), each part by the lowest log loss over its grid: for v2 rows first the
    no-answer scale and shift, `no_answer_probability` as the chance that the question has none; then the
    temperature, `probability` as the chance that the answer given (a span) is exactly right."""
    stated = [(predictions[str(row["id"])], row) for row in rows if str(row["id"]) in predictions]
    if not stated:
        raise ValueError("no predictions to fit a calibration on")
    v2 = [(pred, not row["gold"]) for pred, row in stated if "no_answer_probability" in row]
    scale, shift = _fit_no_answer([p.probabilities()[1] for p, _ in v2], [y for _, y in v2]) if v2 else (1.0, 0.0)
    answered = [(pred, row["exact"] == 1.0) for pred, row in stated if row["prediction"] != "" and pred.nbest]

    def loss(temperature: float) -> float:
        c = Calibration(temperature, scale, shift)
        return sum(_log_loss(pred.probabilities(c)[0][0], right) for pred, right in answered)

    temperature = min(TEMPERATURES, key=loss) if answered else 1.0
    return Calibration(temperature, scale, shift)


def _fit_no_answer(stated: Sequence[float], has_none: Sequence[bool]) -> tuple[float, float]:
    """(scale, shift) of the log-odds of the uncalibrated no-answer probabilities `stated` with the lowest log loss
    of whether each question has no answer (`has_none`)."""
    p = np.clip(np.array(stated, dtype=np.float64), 1e-12, 1 - 1e-12)
    z, y = np.log(p / (1 - p)), np.array(has_none, dtype=np.float64)
    shifts = np.array(NO_ANSWER_SHIFTS)[:, None]
    best = (math.inf, 1.0, 0.0)
    for scale in NO_ANSWER_SCALES:
        x = scale * z[None, :] + shifts
        losses = (np.logaddexp(0.0, x) - y * x).sum(axis=1)  # -log sigmoid(x) or -log(1 - sigmoid(x)), stably
        k = int(np.argmin(losses))
        if losses[k] < best[0]:
            best = (float(losses[k]), scale, NO_ANSWER_SHIFTS[k])
    return best[1], best[2]


def _log_loss(probability: float, came_true: bool) -> float:
    """-log of the probability given to what happened (kept off 0, so one sure mistake is costly, not infinite)."""
    return -math.log(max(probability if came_true else 1.0 - probability, 1e-12))
