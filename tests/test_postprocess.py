"""Post-processing: the vectorised span search against brute force, windows merged, no-answer scores."""

from __future__ import annotations

import numpy as np
import pytest

from bertqa import data
from bertqa.data import Example, Window
from bertqa.postprocess import best_spans, pad_offsets, postprocess


def brute_force(start, end, offsets, max_answer_length):
    best = (-np.inf, 0, 0)
    for i in range(len(start)):
        for j in range(i, min(len(start), i + max_answer_length)):
            if offsets[i, 0] >= 0 and offsets[j, 0] >= 0 and start[i] + end[j] > best[0]:
                best = (start[i] + end[j], i, j)
    return best


def test_vectorised_search_matches_brute_force():
    rng = np.random.default_rng(0)
    n, length = 40, 50
    start = rng.normal(size=(n, length)).astype(np.float32)
    end = rng.normal(size=(n, length)).astype(np.float32)
    offsets = np.tile(np.arange(length)[None, :, None], (n, 1, 2)).astype(np.int32)
    offsets[:, :10] = -1  # question tokens
    offsets[:, -5:] = -1  # padding
    scores, s, e = best_spans(start, end, offsets, max_answer_length=7, n_best=5)
    for k in range(n):
        ref = brute_force(start[k], end[k], offsets[k], 7)
        assert scores[k, 0] == pytest.approx(ref[0]) and (s[k, 0], e[k, 0]) == ref[1:]
        assert np.all(np.diff(scores[k]) <= 0)
        assert np.all((e[k] >= s[k]) & (e[k] - s[k] < 7))


def example(context, answer=None, qid="q"):
    if answer is None:
        return Example(qid, "t", context, "What?", (), (), True)
    return Example(qid, "t", context, "What?", (answer,), (context.index(answer),), False)


def logits_for(features, targets, length):
    """Logits that are 0 everywhere but +5 at the given (window, start, end) tokens."""
    start = np.zeros((len(features), length), dtype=np.float32)
    end = np.zeros_like(start)
    for w, s, e in targets:
        start[w, s] += 5
        end[w, e] += 5
    return start, end


def test_best_span_found_in_a_later_window_and_question_tokens_ignored(tokenizer):
    context = " ".join(f"word{i}" for i in range(200))
    examples = [example(context, "word150 word151")]
    features = data.label_features(data.tokenize_examples(examples, tokenizer, Window(64, 16, 16)), examples)
    w = next(i for i in range(len(features)) if features.start_positions[i] != 0)
    length = int(features.lengths.max())
    start, end = logits_for(features, [(w, features.start_positions[w], features.end_positions[w])], length)
    start[0, 1] = end[0, 1] = 50  # a question token: must never be chosen
    preds = postprocess(examples, features, start, end)
    assert preds["q"].text == "word150 word151"
    assert preds["q"].span_score == pytest.approx(10)
    best = preds["q"].spans()[0]
    assert (best.text, best.score) == ("word150 word151", pytest.approx(10))
    assert examples[0].context[best.start : best.end] == best.text


def test_max_answer_length_is_respected(tokenizer):
    context = "alpha beta gamma delta epsilon zeta eta theta iota kappa"
    examples = [example(context, "alpha")]
    features = data.tokenize_examples(examples, tokenizer)
    sep = features.input_ids[0].tolist().index(tokenizer.sep_token_id)
    first, last = sep + 1, len(features.input_ids[0]) - 2
    start, end = logits_for(features, [(0, first, last)], len(features.input_ids[0]))
    assert postprocess(examples, features, start, end, max_answer_length=100)["q"].text == context
    short = postprocess(examples, features, start, end, max_answer_length=3)["q"].text
    assert short != context and len(short.split()) <= 3


def test_no_answer_score_is_null_minus_best_span(tokenizer):
    examples = [example("Paris is the capital of France.", None, qid="n"), example("It is red.", "red", qid="a")]
    features = data.tokenize_examples(examples, tokenizer)
    length = int(features.lengths.max())
    pad = np.full((len(features), length), -1e4, dtype=np.float32)
    start, end = pad.copy(), pad.copy()
    for i, n in enumerate(features.lengths):
        start[i, :n] = end[i, :n] = 0.0
    start[0, 0] = end[0, 0] = 4.0  # "n": CLS wins by 8
    red = next(t for t in range(length) if tokenizer.convert_ids_to_tokens(int(features.input_ids[1][t])) == "red")
    start[1, red] = end[1, red] = 3.0  # "a": span "red" scores 6 against a null of 0
    preds = postprocess(examples, features, start, end)
    assert preds["n"].null_score == pytest.approx(8.0) and preds["n"].no_answer_score == pytest.approx(8.0)
    assert preds["a"].text == "red" and preds["a"].no_answer_score == pytest.approx(-6.0)
    assert preds["n"].answer(0.0) == "" and preds["a"].answer(0.0) == "red"
    assert preds["n"].answer(None) != ""  # v1.1: always a span


def test_null_score_is_minimum_over_windows_and_merge_picks_best_window(tokenizer):
    context = " ".join(f"word{i}" for i in range(120))
    examples = [example(context, "word5")]
    features = data.tokenize_examples(examples, tokenizer, Window(48, 8, 16))
    n = len(features)
    assert n >= 3
    length = int(features.lengths.max())
    start, end = logits_for(features, [(1, 20, 21), (2, 18, 18)], length)
    start[2, 18] += 3  # window 2 has the better span
    start[:, 0] = np.arange(n)  # null scores 0, 1, 2, ...: the minimum is window 0's
    preds = postprocess(examples, features, start, end)
    offs = features.offsets[2]
    assert preds["q"].text == context[offs[18, 0] : offs[18, 1]]
    assert preds["q"].null_score == pytest.approx(0.0)


def test_pad_offsets_and_shape_check(tokenizer):
    examples = [example("a b c", "b")]
    features = data.tokenize_examples(examples, tokenizer)
    padded = pad_offsets(features, 20)
    assert padded.shape == (1, 20, 2) and np.all(padded[0, len(features.input_ids[0]) :] == -1)
    with pytest.raises(ValueError, match="logits for 2 windows"):
        postprocess(examples, features, np.zeros((2, 5)), np.zeros((2, 5)))


def test_nbest_merged_over_windows_matches_brute_force(tokenizer):
    context = " ".join(f"word{i}" for i in range(150))
    examples = [example(context, "word5", qid="long"), example("short text here", "text", qid="short")]
    features = data.tokenize_examples(examples, tokenizer, Window(48, 8, 16))
    length = int(features.lengths.max())
    rng = np.random.default_rng(3)
    start = rng.normal(size=(len(features), length)).astype(np.float32)
    end = rng.normal(size=(len(features), length)).astype(np.float32)
    preds = postprocess(examples, features, start, end, max_answer_length=5, n_best=6)
    offsets = pad_offsets(features, length)
    for e, ex in enumerate(examples):
        windows = np.flatnonzero(features.example_index == e)
        # Brute force: the best end of every start token of every window, then the top 6 of those.
        spans = []
        for w in windows:
            for i in range(length):
                ends = [j for j in range(i, min(length, i + 5)) if offsets[w, i, 0] >= 0 and offsets[w, j, 0] >= 0]
                if ends:
                    j = max(ends, key=lambda j: end[w, j])
                    spans.append((float(start[w, i] + end[w, j]), offsets[w, i, 0], offsets[w, j, 1]))
        spans.sort(key=lambda s: -s[0])
        distinct = {}  # overlapping windows propose some spans twice: listed once, by the best window's score
        for score, a, b in spans:
            distinct.setdefault((a, b), (score, ex.context[a:b]))
        top = list(distinct.values())[:6]
        got = preds[ex.id].spans()
        assert [span.text for span in got] == [t for _, t in top]
        assert [span.score for span in got] == pytest.approx([s for s, _ in top], rel=1e-5)
        assert all(ex.context[span.start : span.end] == span.text for span in got)
        assert preds[ex.id].null_score == pytest.approx(float((start[windows, 0] + end[windows, 0]).min()))


def test_probabilities_are_a_softmax_over_the_candidates_and_no_answer():
    from bertqa.postprocess import Prediction, Span

    pred = Prediction("a", 2.0, 1.0, -1.0, (("a", 2.0, 0, 1), ("b", 0.0, 2, 3)))
    assert pred.spans()[1] == Span("b", 0.0, 2, 3)
    spans, null = pred.probabilities()
    z = np.exp(2.0) + np.exp(0.0) + np.exp(1.0)
    assert spans == pytest.approx([np.exp(2.0) / z, 1 / z]) and null == pytest.approx(np.exp(1.0) / z)
    assert Prediction("", -np.inf, 0.5, np.inf).probabilities() == ([], 1.0)  # no span at all


def test_a_span_two_windows_propose_is_listed_once_with_their_probabilities_added(tokenizer):
    context = " ".join(f"word{i}" for i in range(60))
    examples = [example(context, "word30")]
    features = data.tokenize_examples(examples, tokenizer, Window(48, 24, 8))
    length = int(features.lengths.max())
    offsets = pad_offsets(features, length)
    target = context.index("word30")
    holding = [w for w in range(len(features)) if target in offsets[w, :, 0].tolist()]
    assert len(holding) >= 2, "the span must lie in the overlap of two windows"
    start = np.zeros((len(features), length), dtype=np.float32)
    end = np.zeros_like(start)
    for w in holding:
        i = offsets[w, :, 0].tolist().index(target)
        j = i + int(np.argmax(offsets[w, i:, 1] == target + len("word30")))
        start[w, i], end[w, j] = 4.0, 4.0
    pred = postprocess(examples, features, start, end, max_answer_length=5, n_best=5)["q"]
    texts = [span.text for span in pred.spans()]
    assert texts[0] == "word30" and texts.count("word30") == 1 and len(set(texts)) == len(texts)
    probs, null = pred.probabilities()
    # Against "no answer", the span weighs what all its windows' copies (score 8 each) weigh together.
    assert probs[0] / null == pytest.approx(len(holding) * np.exp(8.0 - pred.null_score), rel=1e-5)
    assert pred.spans()[0].score == pytest.approx(8.0)
    assert sum(probs) + null == pytest.approx(1.0)


def test_a_question_report_says_what_each_answer_was_worst_first():
    from bertqa.postprocess import Prediction, error_summary, question_report

    def ex(qid, answers):
        return data.Example(
            qid, "", "the cat sat on the mat", "q?", tuple(answers), tuple(0 for _ in answers), not answers
        )

    def pred(text, no_answer_score=-5.0):
        return Prediction(text, 5.0, 0.0, no_answer_score, ((text, 5.0, 0, len(text)),))

    examples = [
        ex("right", ["the cat"]),
        ex("part", ["cat sat"]),
        ex("wrong", ["mat"]),
        ex("none", []),
        ex("missed", ["sat"]),
        ex("quiet", []),
    ]
    predictions = {
        "right": pred("the cat"),
        "part": pred("cat"),
        "wrong": pred("on"),
        "none": pred("the cat"),
        "missed": pred("sat", no_answer_score=3.0),
        "quiet": pred("on", no_answer_score=3.0),
    }
    rows = question_report(examples, predictions, v2=True, threshold=0.0)
    kinds = {row["id"]: row["kind"] for row in rows}
    assert kinds == {
        "right": "right",
        "part": "partial_overlap",
        "wrong": "wrong_span",
        "none": "answered_unanswerable",
        "missed": "no_answer_given",
        "quiet": "right",
    }
    assert [row["f1"] for row in rows] == sorted(row["f1"] for row in rows)
    missed = next(row for row in rows if row["id"] == "missed")
    assert missed["prediction"] == "" and missed["probability"] == pytest.approx(missed["no_answer_probability"])
    assert error_summary(rows) == {
        "no_answer_given": 1,
        "answered_unanswerable": 1,
        "wrong_span": 1,
        "partial_overlap": 1,
        "right": 2,
    }


# ----------------------------------------------------------------------------------------------------- temperature


def _stated(scores, right, *, null=-30.0):
    """Questions whose best span ("aa") scores `scores[i]` against a runner-up ("bb", 0): right or not as told."""
    from bertqa.postprocess import Prediction

    examples, predictions = [], {}
    for i, (a, ok) in enumerate(zip(scores, right)):
        qid = f"q{i}"
        examples.append(data.Example(qid, "", "aa bb", "q?", ("aa" if ok else "bb",), (0 if ok else 3,)))
        predictions[qid] = Prediction("aa", a, null, null - a, (("aa", a, 0, 2), ("bb", 0.0, 3, 5)))
    return examples, predictions


def test_a_fitted_temperature_makes_overconfident_probabilities_mean_what_they_say():
    from bertqa.postprocess import Calibration, confidence, fit_calibration, question_report

    rng = np.random.default_rng(0)
    scores = rng.uniform(0.5, 4.0, 3000)
    right = rng.random(3000) < 1 / (1 + np.exp(-scores / 2))  # what comes true is what a temperature of 2 states
    examples, predictions = _stated(scores, right)
    rows = question_report(examples, predictions, v2=False, threshold=None)
    fitted = fit_calibration(rows, predictions)
    assert fitted.temperature == pytest.approx(2.0, rel=0.1)
    assert (fitted.no_answer_scale, fitted.no_answer_shift) == (1.0, 0.0)  # v1: nothing states "no answer"
    after = question_report(examples, predictions, v2=False, threshold=None, calibration=fitted)
    ece = [confidence(r)["probability"]["ece"] for r in (rows, after)]
    assert ece[0] > 0.1 and ece[1] < 0.03
    # No answer changes: the same prediction and outcome for every question, only its probability.
    assert [(r["id"], r["prediction"], r["exact"]) for r in sorted(rows, key=lambda r: r["id"])] == [
        (r["id"], r["prediction"], r["exact"]) for r in sorted(after, key=lambda r: r["id"])
    ]
    assert question_report(examples, predictions, v2=False, threshold=None, calibration=Calibration()) == rows


def test_probabilities_that_already_hold_keep_a_temperature_near_1_and_their_order_under_any_calibration():
    from bertqa.postprocess import Calibration, Prediction, fit_calibration, question_report

    rng = np.random.default_rng(1)
    scores = rng.uniform(-2.0, 4.0, 3000)
    right = rng.random(3000) < 1 / (1 + np.exp(-scores))
    examples, predictions = _stated(scores, right)
    rows = question_report(examples, predictions, v2=False, threshold=None)
    assert fit_calibration(rows, predictions).temperature == pytest.approx(1.0, rel=0.1)
    pred = Prediction("a", 2.0, 1.0, -1.0, (("a", 2.0, 0, 1), ("b", 0.5, 2, 3)))
    for c in (Calibration(0.3, 2.0, -1.0), Calibration(), Calibration(3.0, 0.5, 2.0)):
        spans, null = pred.probabilities(c)
        assert spans[0] > spans[1] and sum(spans) + null == pytest.approx(1.0)


def test_a_v2_calibration_makes_the_no_answer_probability_mean_what_it_says():
    from bertqa.postprocess import Prediction, confidence, fit_calibration, question_report

    # The no-answer log-odds z (null score against the one span) state sigmoid(z); what comes true is sigmoid(z/2 - 1).
    rng = np.random.default_rng(2)
    examples, predictions = [], {}
    for i, z in enumerate(rng.uniform(-4.0, 4.0, 3000)):
        none = bool(rng.random() < 1 / (1 + np.exp(-(z / 2 - 1))))
        qid = f"q{i}"
        examples.append(data.Example(qid, "", "aa bb", "q?", () if none else ("aa",), () if none else (0,), none))
        predictions[qid] = Prediction("aa", 0.0, z, z, (("aa", 0.0, 0, 2),))
    rows = question_report(examples, predictions, v2=True, threshold=0.0)
    fitted = fit_calibration(rows, predictions)
    assert fitted.no_answer_scale == pytest.approx(0.5, rel=0.15) and fitted.no_answer_shift == pytest.approx(
        -1, abs=0.2
    )
    after = question_report(examples, predictions, v2=True, threshold=0.0, calibration=fitted)
    ece = [confidence(r)["no_answer_probability"]["ece"] for r in (rows, after)]
    assert ece[0] > 0.15 and ece[1] < 0.03
    answers = [{r["id"]: r["prediction"] for r in report} for report in (rows, after)]
    assert answers[0] == answers[1]  # the threshold decides, as before
