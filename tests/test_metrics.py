"""Official SQuAD EM/F1, checked against values computed by hand."""

from __future__ import annotations

import random

import pytest

from bertqa.metrics import best_threshold, exact_match, f1_score, normalize_answer, squad_v1_scores, squad_v2_scores


def test_normalize_answer():
    assert normalize_answer("The  Quick, brown fox!") == "quick brown fox"
    assert normalize_answer("An apple a day") == "apple day"
    assert normalize_answer("theatre") == "theatre"  # articles only as whole words


def test_exact_match_and_f1_by_hand():
    assert exact_match("The Cat.", "cat") == 1.0
    # pred {cat, sat}, gold {cat, sat, on, mat}: P = 1, R = 1/2, F1 = 2/3.
    assert f1_score("the cat sat", "cat sat on the mat") == pytest.approx(2 / 3)
    # Repeated tokens count with multiplicity: pred {a1 x2}, gold {a1 x1}: common 1, P = 1/2, R = 1, F1 = 2/3.
    assert f1_score("x x", "x") == pytest.approx(2 / 3)
    assert f1_score("", "cat") == 0.0
    assert f1_score("", "", v2=True) == 1.0 and f1_score("cat", "", v2=True) == 0.0


def test_v1_scores_take_the_best_gold_answer():
    golds = {"a": ["Denver Broncos", "Broncos"], "b": ["1858"], "c": ["Paris"]}
    preds = {"a": "the Broncos", "b": "in 1858 or so"}  # c has no prediction: scores 0
    scores = squad_v1_scores(preds, golds)
    # a: EM 1 (matches "Broncos"); b: F1 with 1 of 4 pred tokens: P 1/4, R 1 -> 0.4; c: 0.
    assert scores["exact"] == pytest.approx(100 / 3)
    assert scores["f1"] == pytest.approx(100 * (1 + 0.4) / 3)
    with pytest.raises(ValueError):
        squad_v1_scores({}, {})


def test_v2_splits_and_empty_answers():
    # n2's only answer normalises to nothing: it is scored against "" but, as in the official script, counted under
    # HasAns because its answer list is not empty.
    golds = {"h1": ["Paris"], "h2": ["red car"], "n1": [], "n2": ["  "]}
    preds = {"h1": "Paris", "h2": "car", "n1": "", "n2": "something"}
    s = squad_v2_scores(preds, golds)
    assert s["HasAns_total"] == 3 and s["NoAns_total"] == 1
    assert s["HasAns_exact"] == pytest.approx(100 / 3) and s["HasAns_f1"] == pytest.approx(100 * (1 + 2 / 3) / 3)
    assert s["NoAns_exact"] == 100.0 and s["NoAns_f1"] == 100.0
    assert s["f1"] == pytest.approx(100 * (1 + 2 / 3 + 1 + 0) / 4)


# The official scripts' definitions, restated here as plainly as possible to check the library against them.
def reference_v1(golds, preds):
    em = f1 = 0.0
    for qid, answers in golds.items():
        if qid in preds:  # "Unanswered question will receive score 0"
            em += max(exact_match(preds[qid], a) for a in answers)
            f1 += max(f1_score(preds[qid], a) for a in answers)
    return 100 * em / len(golds), 100 * f1 / len(golds)


def reference_v2(golds, preds):
    has_ans = {qid: bool(answers) for qid, answers in golds.items()}  # make_qid_to_has_ans: bool(qa["answers"])
    f1 = {}
    for qid, answers in golds.items():
        kept = [a for a in answers if normalize_answer(a)] or [""]
        f1[qid] = max(f1_score(preds[qid], a, v2=True) for a in kept)
    split = {k: [f1[q] for q in golds if has_ans[q] == (k == "HasAns")] for k in ("HasAns", "NoAns")}
    return {k: 100 * sum(v) / len(v) for k, v in split.items() if v}


@pytest.mark.parametrize(
    ("golds", "preds"),
    [
        ({"q": ["x", "."]}, {}),  # a missing prediction must not match the gold "." through ""
        ({"q": ["."], "r": ["a cat"]}, {"r": "cat"}),
        ({"q": ["The"], "r": ["Paris"]}, {"q": "", "r": "Paris"}),
    ],
)
def test_v1_edge_cases_as_the_official_script(golds, preds):
    scores = squad_v1_scores(preds, golds)
    assert (scores["exact"], scores["f1"]) == pytest.approx(reference_v1(golds, preds))
    assert squad_v1_scores({}, {"q": ["x", "."]})["exact"] == 0.0


@pytest.mark.parametrize(
    ("golds", "preds"),
    [
        ({"a": ["."], "b": [], "c": ["Paris"]}, {"a": "", "b": "", "c": "Paris"}),
        ({"a": ["The", "an"], "b": ["x"]}, {"a": "something", "b": ""}),
        ({"a": [], "b": ["!"]}, {"a": "y", "b": ""}),
    ],
)
def test_v2_answers_that_normalise_to_nothing_count_as_has_answer(golds, preds):
    scores = squad_v2_scores(preds, golds)
    expected = reference_v2(golds, preds)
    for split, value in expected.items():
        assert scores[f"{split}_f1"] == pytest.approx(value), split
    assert "NoAns_f1" not in scores or "NoAns" in expected


def test_v2_best_threshold_by_hand():
    golds = {"q1": ["x"], "q2": ["b c"], "q3": [], "q4": []}
    preds = {"q1": "x", "q2": "b", "q3": "c", "q4": "d"}  # span predictions; q2 has F1 2/3, EM 0
    na = {"q1": 0.1, "q2": 0.9, "q3": 0.5, "q4": 2.0}
    # All "no answer": 2 points. Rising na: q1 +1 -> 3 (thr 0.1), q3 -1 -> 2, q2 +2/3 -> 2.67, q4 -1 -> 1.67.
    s = squad_v2_scores(preds, golds, na, threshold=0.1)
    assert s["best_f1"] == pytest.approx(75.0) and s["best_f1_thresh"] == 0.1
    assert s["best_exact"] == pytest.approx(75.0) and s["best_exact_thresh"] == 0.1
    # Applying the best threshold gives the best score.
    assert s["f1"] == pytest.approx(s["best_f1"])
    # With threshold 1.0 only q4 becomes "no answer": q1 1 + q2 2/3 + q3 0 + q4 1.
    assert squad_v2_scores(preds, golds, na)["f1"] == pytest.approx(100 * (2 + 2 / 3) / 4)


def test_best_threshold_keeps_everything_unanswered_when_that_is_best():
    score, thresh = best_threshold({"q": 0.0}, {"q": 3.0}, {"q": False})
    assert score == 100.0 and thresh < 3.0


def test_best_threshold_below_negative_scores_really_answers_nothing():
    # No-answer scores are logit differences, often negative: a threshold of 0 would answer everything here.
    golds = {"q1": [], "q2": []}
    preds = {"q1": "is", "q2": "big"}
    na = {"q1": -2.0, "q2": -1.0}
    s = squad_v2_scores(preds, golds, na)
    assert s["best_f1"] == 100.0 and s["best_f1_thresh"] < -2.0
    assert squad_v2_scores(preds, golds, na, threshold=s["best_f1_thresh"])["f1"] == 100.0
    assert squad_v2_scores(preds, golds, na, threshold=0.0)["f1"] == 0.0
    # An answerable question whose span is wrong ties with its "no answer": it is answered (the official script
    # would say "no answer" to it), and still nothing else is.
    golds["q1"] = ["it was"]
    s = squad_v2_scores(preds, golds, na)
    assert s["best_f1"] == 50.0 and -2.0 <= s["best_f1_thresh"] < -1.0


def test_best_threshold_switches_tied_scores_together():
    # q1 (right) and q2 (unanswerable, wrongly answered) share one score: no threshold answers only q1.
    golds, preds = {"q1": ["x"], "q2": [], "q3": []}, {"q1": "x", "q2": "y", "q3": "z"}
    na = {"q1": 0.5, "q2": 0.5, "q3": 0.9}
    s = squad_v2_scores(preds, golds, na)
    assert s["best_f1"] == pytest.approx(100 * 2 / 3)
    assert squad_v2_scores(preds, golds, na, threshold=s["best_f1_thresh"])["f1"] == pytest.approx(s["best_f1"])


def test_best_threshold_refuses_nan_scores_by_question():
    with pytest.raises(ValueError, match=r"'q2'.*NaN"):
        best_threshold({"q1": 1.0, "q2": 0.0}, {"q1": 0.0, "q2": float("nan")}, {"q1": True, "q2": False})


@pytest.mark.parametrize("seed", range(300))
def test_scoring_at_the_best_threshold_gives_the_best_score(seed):
    """For any predictions and no-answer scores (ties, negatives, missing ones, answers that normalise to nothing),
    scoring at the returned threshold gives the returned best score, and no other threshold does better."""
    rng = random.Random(seed)
    words = ["a", "b", "c", "the", ".", "b c"]
    golds, preds, na = {}, {}, {}
    for i in range(rng.randint(1, 12)):
        q = f"q{i}"
        golds[q] = rng.sample(words, rng.randint(1, 2)) if rng.random() < 0.6 else []
        if rng.random() < 0.9:
            preds[q] = rng.choice([*words, ""])
        if rng.random() < 0.9:
            na[q] = rng.choice([-3.0, -1.5, -1.0, 0.0, 0.5, 2.0, rng.uniform(-4, 4)])
    s = squad_v2_scores(preds, golds, na)
    thresholds = sorted({na.get(q, 0.0) for q in golds})
    candidates = [thresholds[0] - 1, *thresholds]
    for key in ("f1", "exact"):
        at_best = squad_v2_scores(preds, golds, na, threshold=s[f"best_{key}_thresh"])[key]
        assert at_best == pytest.approx(s[f"best_{key}"]), key
        brute = max(squad_v2_scores(preds, golds, na, threshold=t)[key] for t in candidates)
        assert s[f"best_{key}"] == pytest.approx(brute), key


@pytest.mark.parametrize("seed", range(300))
def test_the_best_threshold_answers_the_most_among_equally_good_ones(seed):
    """Of all thresholds that score best, the returned one answers at least as many questions as any (a tie never
    turns an answer into ""), and with no unanswerable question it answers every question."""
    rng = random.Random(1000 + seed)
    words = ["a", "b", "c", "the", "b c"]
    answerable_only = rng.random() < 0.3
    golds, preds, na = {}, {}, {}
    for i in range(rng.randint(1, 12)):
        q = f"q{i}"
        golds[q] = rng.sample(words, rng.randint(1, 2)) if answerable_only or rng.random() < 0.6 else []
        preds[q] = rng.choice([*words, ""])
        na[q] = rng.choice([-2.0, -1.0, 0.0, 1.0, rng.uniform(-3, 3)])
    s = squad_v2_scores(preds, golds, na)
    candidates = [min(na.values()) - 1, *sorted(set(na.values()))]
    best_ones = [t for t in candidates if squad_v2_scores(preds, golds, na, threshold=t)["f1"] >= s["best_f1"] - 1e-6]
    assert s["best_f1_thresh"] >= max(best_ones)
    if answerable_only:
        assert all(value <= s["best_f1_thresh"] for value in na.values())  # nothing is "no answer"


def test_with_no_unanswerable_question_a_wrong_answer_is_still_given():
    # Both questions have answers; q2's span is wrong, so answering it and saying "no answer" both score 0.
    golds = {"q1": ["a b"], "q2": ["c"]}
    preds = {"q1": "a b", "q2": "the"}
    na = {"q1": -1.0, "q2": 0.5}
    s = squad_v2_scores(preds, golds, na)
    assert s["best_f1"] == 50.0 and s["best_f1_thresh"] >= 0.5  # q2 is answered too


def test_scores_equal_the_per_answer_definitions_on_real_answers():
    from bertqa.loading import load_squad

    examples, _ = load_squad("dev-v2.0")
    examples = examples[:600]
    # Predictions that hit, half-hit and miss: the first gold answer, its first word, a word of the context, "".
    preds = {}
    for i, ex in enumerate(examples):
        first = ex.answer_texts[0] if ex.answer_texts else ex.context.split()[3]
        preds[ex.id] = [first, first.split()[0], ex.context.split()[i % 7], ""][i % 4]
    golds = {ex.id: list(ex.answer_texts) for ex in examples}
    answerable = {q: g for q, g in golds.items() if g}
    v1 = squad_v1_scores(preds, answerable)
    em = [max(exact_match(preds[q], a) for a in g) for q, g in answerable.items()]
    f1 = [max(f1_score(preds[q], a) for a in g) for q, g in answerable.items()]
    assert v1["exact"] == pytest.approx(100 * sum(em) / len(em)) and v1["f1"] == pytest.approx(100 * sum(f1) / len(f1))
    v2 = squad_v2_scores(preds, golds)
    f1_v2 = [max(f1_score(preds[q], a, v2=True) for a in (g or [""])) for q, g in golds.items()]
    assert v2["f1"] == pytest.approx(100 * sum(f1_v2) / len(f1_v2))
    assert 0 < v1["exact"] < v1["f1"] < 100


def test_the_expected_calibration_error_by_hand():
    from bertqa.metrics import calibration_bins, expected_calibration_error

    # Bin 0.7-0.8: stated 0.75 twice, one came true (0.5). Bin 0.2-0.3: stated 0.25 twice, neither came true.
    table = calibration_bins([0.75, 0.75, 0.25, 0.25], [True, False, False, False])
    filled = [row for row in table if row["count"]]
    assert [(row["low"], row["count"], row["confidence"], row["accuracy"]) for row in filled] == [
        pytest.approx((0.2, 2, 0.25, 0.0)),
        pytest.approx((0.7, 2, 0.75, 0.5)),
    ]
    assert expected_calibration_error(table) == pytest.approx((2 * 0.25 + 2 * 0.25) / 4)
    # Stated as they come true: no error; 1.0 lands in the last bin.
    exact = calibration_bins([1.0, 1.0, 0.0, 0.0], [True, True, False, False])
    assert expected_calibration_error(exact) == 0.0 and exact[-1]["count"] == 2
    with pytest.raises(ValueError, match="no probabilities"):
        expected_calibration_error(calibration_bins([], []))
