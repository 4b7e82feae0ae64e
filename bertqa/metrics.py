"""SQuAD scoring: exact match and F1 as the official v1.1 and v2.0 evaluation scripts define them.

v1.1: each question scores the maximum over its gold answers; EM and F1 are averages in percent.
v2.0: an unanswerable question's only gold answer is the empty string; an empty prediction or gold answer scores
1 only against an empty counterpart. Results are split into HasAns/NoAns, and the no-answer threshold that would have
maximised each metric is searched over the per-question no-answer scores ("best_exact"/"best_f1").
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Mapping, Sequence

__all__ = [
    "best_threshold",
    "calibration_bins",
    "exact_match",
    "expected_calibration_error",
    "f1_score",
    "normalize_answer",
    "question_scores",
    "squad_v1_scores",
    "squad_v2_scores",
]

# str.translate deletes the same characters as the official `"".join(ch for ch in s if ch not in punctuation)`,
# several times faster (scoring the v2 dev set normalises ~125k strings).
_DROP_PUNCT = str.maketrans("", "", string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation and the articles a/an/the, and collapse whitespace (the official normalisation)."""
    text = text.lower().translate(_DROP_PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def f1_score(prediction: str, gold: str, *, v2: bool = False) -> float:
    """Token-overlap F1 after normalisation. With `v2`, an empty side scores 1 only if both are empty."""
    return _token_f1(normalize_answer(prediction).split(), normalize_answer(gold).split(), v2=v2)


def _token_f1(pred_tokens: list[str], gold_tokens: list[str], *, v2: bool) -> float:
    if v2 and (not pred_tokens or not gold_tokens):
        return float(pred_tokens == gold_tokens)
    common = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if common == 0:
        return 0.0
    precision = common / len(pred_tokens)
    recall = common / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def _best_em_f1(prediction: str, golds: Sequence[str], *, v2: bool) -> tuple[float, float]:
    """max over the gold answers of EM and of F1, normalising each string once (the same values as calling
    `exact_match` and `f1_score` per gold answer)."""
    pred = normalize_answer(prediction)
    pred_tokens = pred.split()
    em = f1 = 0.0
    for answer in golds:
        gold = normalize_answer(answer)
        em = max(em, float(pred == gold))
        f1 = max(f1, _token_f1(pred_tokens, gold.split(), v2=v2))
    return em, f1


def squad_v1_scores(predictions: Mapping[str, str], golds: Mapping[str, Sequence[str]]) -> dict[str, float]:
    """Official v1.1 EM/F1 (percent) over the questions in `golds`; a question without a prediction scores 0.

    (Not the score of an empty prediction: a gold answer such as "." normalises to nothing and would match it.)
    """
    if not golds:
        raise ValueError("no gold answers to score against")
    em = f1 = 0.0
    for qid, answers in golds.items():
        if qid not in predictions:
            continue
        q_em, q_f1 = _best_em_f1(predictions[qid], answers, v2=False)
        em += q_em
        f1 += q_f1
    # Named "exact" (the official v1.1 script says "exact_match") so v1.1 and v2.0 results share their keys.
    return {"exact": 100 * em / len(golds), "f1": 100 * f1 / len(golds), "total": float(len(golds))}


def question_scores(prediction: str, answers: Sequence[str], *, v2: bool) -> tuple[float, float]:
    """One question's (EM, F1), 0 or 1 and 0 to 1, as the official scripts score it: the best over its answers;
    for v2, a question without answers is right exactly when the prediction is ""."""
    return _best_em_f1(prediction, _v2_golds(answers) if v2 else list(answers), v2=v2)


def _v2_golds(answers: Sequence[str]) -> list[str]:
    # Official v2: answers that normalise to nothing are dropped; a question left with none is unanswerable.
    kept = [a for a in answers if normalize_answer(a)]
    return kept or [""]


def squad_v2_scores(
    predictions: Mapping[str, str],
    golds: Mapping[str, Sequence[str]],
    no_answer_scores: Mapping[str, float] | None = None,
    threshold: float = 1.0,
) -> dict[str, float]:
    """Official v2.0 metrics (percent) with HasAns/NoAns splits.

    `predictions` are the predicted texts ("" for no answer). When `no_answer_scores` are given, a question whose
    score is above `threshold` counts as predicted unanswerable, and the best threshold for EM and for F1 is
    searched as the official script does (`best_exact`, `best_exact_thresh`, `best_f1`, `best_f1_thresh`), corrected
    so that scoring at the returned threshold gives the returned score (see `best_threshold`).
    """
    if not golds:
        raise ValueError("no gold answers to score against")
    raw_em: dict[str, float] = {}
    raw_f1: dict[str, float] = {}
    has_ans: dict[str, bool] = {}
    for qid, answers in golds.items():
        gold = _v2_golds(answers)
        # As the official script: a question has an answer when its answer list is not empty, even if every
        # answer normalises to nothing (it is then scored against "" but still counted under HasAns).
        has_ans[qid] = bool(answers)
        raw_em[qid], raw_f1[qid] = _best_em_f1(predictions.get(qid, ""), gold, v2=True)
    em, f1 = raw_em, raw_f1
    if no_answer_scores is not None:
        em = _apply_threshold(raw_em, no_answer_scores, has_ans, threshold)
        f1 = _apply_threshold(raw_f1, no_answer_scores, has_ans, threshold)
    out = _averages(em, f1, list(golds))
    for name, keep in (("HasAns", True), ("NoAns", False)):
        qids = [q for q in golds if has_ans[q] == keep]
        if qids:
            split = _averages(em, f1, qids)
            out.update({f"{name}_exact": split["exact"], f"{name}_f1": split["f1"], f"{name}_total": split["total"]})
    if no_answer_scores is not None:
        out["best_exact"], out["best_exact_thresh"] = best_threshold(raw_em, no_answer_scores, has_ans)
        out["best_f1"], out["best_f1_thresh"] = best_threshold(raw_f1, no_answer_scores, has_ans)
        for name, keep in (("HasAns", True), ("NoAns", False)):  # what the best threshold does: how many it answers
            answered = [
                q for q in golds if has_ans[q] == keep and no_answer_scores.get(q, 0.0) <= out["best_f1_thresh"]
            ]
            out[f"best_f1_{name}_answered"] = float(len(answered))
    return out


def _averages(em: Mapping[str, float], f1: Mapping[str, float], qids: Sequence[str]) -> dict[str, float]:
    return {
        "exact": 100 * sum(em[q] for q in qids) / len(qids),
        "f1": 100 * sum(f1[q] for q in qids) / len(qids),
        "total": float(len(qids)),
    }


def _apply_threshold(
    scores: Mapping[str, float], na_scores: Mapping[str, float], has_ans: Mapping[str, bool], threshold: float
) -> dict[str, float]:
    # Above the threshold the answer is "no answer": right exactly when the question has none.
    return {q: (float(not has_ans[q]) if na_scores.get(q, 0.0) > threshold else s) for q, s in scores.items()}


def best_threshold(
    scores: Mapping[str, float], na_scores: Mapping[str, float], has_ans: Mapping[str, bool]
) -> tuple[float, float]:
    """The no-answer threshold that maximises the total score, and that score in percent.

    `scores` are each question's raw score when its span is given (EM or F1, as `squad_v2_scores` computes them);
    a question whose no-answer score is above the threshold is answered "no answer" instead, worth 1 exactly when it
    has no answer (a missing no-answer score counts as 0, as when scoring). The search follows the official v2.0
    script, with two corrections that make the returned score the one obtained by scoring at the returned threshold:
    - it starts below the lowest no-answer score, so "no answer" to everything is a reachable threshold even when
      the scores are negative (they are logit differences here, not probabilities);
    - questions sharing one no-answer score switch together, since no threshold separates them.
    Among thresholds that score alike it returns the highest, the one that answers the most questions: where a wrong
    span and "no answer" are worth the same (0, on a question that has an answer), the question is answered. The
    official script keeps the lowest, so that with no unanswerable question at all its threshold answers nothing.
    """
    na = {q: na_scores.get(q, 0.0) for q in scores}
    nan = [q for q, value in na.items() if math.isnan(value)]
    if nan:
        raise ValueError(f"no-answer score of question {nan[0]!r} is NaN ({len(nan)} such questions)")
    if not scores:
        raise ValueError("no questions to choose a threshold on")
    order = sorted(scores, key=na.__getitem__)
    lowest = na[order[0]]
    total = float(sum(not has_ans[q] for q in scores))
    # Just below the lowest score: 1 lower where that is representable, else the next float down.
    best, best_thresh = total, min(lowest - 1.0, math.nextafter(lowest, -math.inf))
    if lowest == -math.inf:  # nothing is below it: those questions are always answered
        best = -math.inf
    for i, qid in enumerate(order):
        total += scores[qid] - float(not has_ans[qid])  # the span's score replaces what "no answer" was worth
        last_of_tie = i + 1 == len(order) or na[order[i + 1]] != na[qid]
        # A tie goes to the threshold that answers more (sums of F1 in another order may differ in the last bits).
        if last_of_tie and total >= best - 1e-9:
            best, best_thresh = total, na[qid]
    return 100 * best / len(scores), best_thresh


def calibration_bins(
    confidences: Sequence[float], outcomes: Sequence[bool], *, bins: int = 10
) -> list[dict[str, float]]:
    """Reliability of a stated probability: the questions in `bins` equal-width bins of `confidences` (0 to 1; 1
    falls in the last), each bin's range, count, mean confidence and the share of its `outcomes` that came true."""
    if len(confidences) != len(outcomes):
        raise ValueError(f"{len(confidences)} confidences for {len(outcomes)} outcomes")
    table = []
    for b in range(bins):
        low, high = b / bins, (b + 1) / bins
        inside = [(c, o) for c, o in zip(confidences, outcomes) if low <= c < high or (b == bins - 1 and c == high)]
        n = len(inside)
        mean = sum(c for c, _ in inside) / n if n else 0.0
        hits = sum(o for _, o in inside) / n if n else 0.0
        table.append({"low": low, "high": high, "count": n, "confidence": mean, "accuracy": hits})
    return table


def expected_calibration_error(table: Sequence[Mapping[str, float]]) -> float:
    """The expected calibration error of a `calibration_bins` table: the gap between confidence and accuracy,
    averaged over the questions (each bin weighted by its count); 0 is a probability that means what it says."""
    total = sum(row["count"] for row in table)
    if not total:
        raise ValueError("no probabilities to measure")
    return sum(row["count"] * abs(row["accuracy"] - row["confidence"]) for row in table) / total
