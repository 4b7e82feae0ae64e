"""Negatives from other passages: never holding the answer, seeded, counted, and what they do to a run."""

from __future__ import annotations

import json
import os

import pytest

from bertqa import sources
from bertqa.config import TrainConfig
from bertqa.examples import Example
from bertqa.negatives import add_negatives, holds_answer
from bertqa.sources import run_examples


@pytest.fixture(scope="module")
def dev():
    return sources.load_examples("dev-v1.1[:6]")[0]


def negatives_of(examples):
    return [ex for ex in examples if ex.is_impossible]


def test_no_negative_holds_an_answer_of_its_question(dev):
    out, report = add_negatives(dev, 2, seed=0)
    source = {ex.id: ex for ex in dev}
    negs = negatives_of(out)
    assert out[: len(dev)] == dev and len(negs) == report.added > len(dev)  # up to 2 each, most get 2
    same_article = 0
    for neg in negs:
        question = source[neg.id.rsplit("-neg", 1)[0]]
        assert neg.question == question.question
        same_article += neg.title == question.title
        assert neg.context != question.context and not neg.answer_texts and not neg.answer_starts
        for answer in question.answer_texts:
            assert answer.casefold() not in neg.context.casefold()
    assert len({ex.id for ex in out}) == len(out)
    assert same_article == dict(report.by_kind)["same article"] > 0.9 * len(negs)  # other articles only as a fallback
    assert report.questions == len(dev) and report.rejected > 0  # articles repeat their answers: some were refused
    text = report.format()
    assert f"{report.added:,} unanswerable examples added" in text and f"{report.rejected:,} candidate" in text


def test_holds_answer_as_text_or_as_normalised_words():
    assert holds_answer("Built in 1990 by Ann.", ["1990"])
    assert holds_answer("It was THE Eiffel tower.", ["eiffel Tower"])
    assert holds_answer("the U.S. Army", ["US army"])  # the same words once normalised
    assert holds_answer("the denver-broncos lost", ["Denver Broncos"])  # the same words, other punctuation
    assert not holds_answer("A bus stopped.", ["U.S."])  # "us" is a word of the answer, not a part of "bus"
    assert not holds_answer("Nothing here.", ["Ann", "1990"])


def test_negatives_are_seeded_per_question(dev):
    first, _ = add_negatives(dev, 1, seed=3)
    again, _ = add_negatives(dev, 1, seed=3)
    other, _ = add_negatives(dev, 1, seed=4)
    assert first == again and first != other
    # A question's negative does not depend on which other questions are loaded beside it.
    alone, _ = add_negatives(dev[5:9], 1, seed=3, pool=dev)
    assert negatives_of(alone) == [
        neg for neg in negatives_of(first) if neg.id.rsplit("-neg", 1)[0] in {ex.id for ex in dev[5:9]}
    ]


def test_without_titles_the_lexically_closest_passage_is_chosen():
    passages = {
        "bees": "Bees make honey from nectar collected from flowers in spring.",
        "ships": "The ship sailed from the harbour at dawn with its crew.",
        "honey": "Honey from flowers keeps for years; nectar is what bees collect.",
    }
    q = Example("q1", "", passages["bees"], "What do bees make from nectar?", ("honey",), (10,), False)
    other = Example("q2", "", passages["ships"], "When did the ship sail?", ("at dawn",), (36,), False)
    third = Example("q3", "", passages["honey"], "How long does it keep?", ("for years",), (25,), False)
    out, report = add_negatives([q, other, third], 1, seed=0)
    assert dict(report.by_kind)["same article"] == 0 and "lexically closest" in report.format()
    neg = next(ex for ex in out if ex.id == "q1-neg1")
    # The honey passage shares the most words with the question but holds "honey": refused, the ship is next.
    assert neg.context == passages["ships"] and report.rejected >= 1


def test_single_passage_articles_borrow_from_other_articles():
    examples = [Example(f"q{i}", f"T{i}", f"Passage number {i} is here.", "Which?", (str(i),), (15,)) for i in range(4)]
    out, report = add_negatives(examples, 1, seed=0)
    assert report.added == 4 and report.without == 0 and dict(report.by_kind)["same article"] == 0
    assert all(neg.title != ex.title for ex, neg in zip(examples, negatives_of(out)))


def test_questions_whose_answer_is_everywhere_get_none_and_are_counted():
    examples = [Example(f"q{i}", f"T{i}", f"Ann wrote passage {i}.", "Who?", ("Ann",), (0,)) for i in range(4)]
    out, report = add_negatives(examples, 2, seed=0)
    assert out == examples and report.added == 0 and report.without == 4 and report.rejected == 12
    assert "4 questions got no negative (every other passage held their answer)" in report.format()
    with pytest.raises(ValueError, match="added no unanswerable example to the training data"):
        run_examples("x", train_examples=examples, eval_examples=examples[:1], negatives=1)


def test_negatives_do_not_depend_on_string_hashing(tmp_path):
    # Untitled data goes through the lexical ranking, whose sets must never decide an order.
    import subprocess
    import sys

    code = (
        "from bertqa.sources import load_examples; from bertqa.negatives import add_negatives; import hashlib;"
        "ex = [e.__class__(e.id, '', e.context, e.question, e.answer_texts, e.answer_starts) "
        "for e in load_examples('dev-v1.1[:3]')[0]];"
        "out, _ = add_negatives(ex, 2, seed=1); print(hashlib.sha256(repr(out).encode()).hexdigest())"
    )
    env = {**os.environ}
    runs = set()
    for h in (1, 2, 3):
        env["PYTHONHASHSEED"] = str(h)
        runs.add(
            subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
        )
    assert len(runs) == 1 and len(runs.pop().strip()) == 64


@pytest.mark.parametrize("bad", [-1, 1.5, True, "2"])
def test_a_bad_number_of_negatives_is_refused(bad):
    with pytest.raises(ValueError, match="negatives per question must be a whole number >= 0"):
        add_negatives([], bad, seed=0)


def test_the_config_refuses_a_bad_number_by_name():
    with pytest.raises(ValueError, match="negatives must be a whole number >= 0"):
        TrainConfig(negatives=-1)
    with pytest.raises(ValueError, match="key 'negatives': expected int"):
        TrainConfig(negatives=1.5)


def test_negatives_make_a_calibrated_v2_run_from_answerable_data():
    runs = run_examples("dev-v1.1[:12]", eval_data="dev-v1.1[30:32]", negatives=1, max_eval_examples=50, seed=1)
    plain = run_examples("dev-v1.1[:12]", eval_data="dev-v1.1[30:32]", max_eval_examples=50, seed=1)
    assert runs.v2 and not plain.v2 and not plain.calibration
    assert negatives_of(runs.train) and negatives_of(runs.calibration)
    # The named evaluation data is scored as it is; training and calibration articles stay apart, negatives too.
    assert runs.eval == plain.eval
    assert not {ex.title for ex in runs.train} & {ex.title for ex in runs.calibration}
    assert not {ex.context for ex in runs.train} & {ex.context for ex in runs.calibration}
    sides = [r.side for r in runs.reports if hasattr(r, "side")]
    assert sides == ["training", "the threshold's held-out questions"]
    # Deterministic, so the window cache finds them again.
    assert runs == run_examples("dev-v1.1[:12]", eval_data="dev-v1.1[30:32]", negatives=1, max_eval_examples=50, seed=1)


def test_a_held_out_evaluation_share_gets_negatives_too():
    runs = run_examples("dev-v1.1[:12]", eval_split=0.2, negatives=2, seed=0)
    assert negatives_of(runs.eval) and "the held-out evaluation share" in [getattr(r, "side", "") for r in runs.reports]
    assert not {ex.title for ex in runs.train} & {ex.title for ex in runs.eval}


def test_max_examples_count_the_questions_drawn_before_negatives():
    runs = run_examples("dev-v1.1[:12]", eval_data="dev-v1.1[20:22]", negatives=1, max_train_examples=30, seed=0)
    answerable = [ex for ex in runs.train if not ex.is_impossible]
    assert len(answerable) == 30 and 0 < len(negatives_of(runs.train)) <= 30


def test_joined_sources_are_read_one_after_the_other(tmp_path):
    examples, report = sources.load_examples("dev-v1.1[:1]+dev-v2.0[30:31]")
    one, _ = sources.load_examples("dev-v1.1[:1]")
    two, _ = sources.load_examples("dev-v2.0[30:31]")
    assert examples == one + two and report.n_examples == len(examples)
    assert report.n_impossible == sum(ex.is_impossible for ex in two) > 0 and report.version == "v2.0"
    with pytest.raises(ValueError, match=r"is in both dev-v2\.0"):
        sources.load_examples("dev-v2.0[:1]+dev-v2.0[:1]")
    with pytest.raises(ValueError, match="an empty source around"):
        sources.load_examples("dev-v1.1+")
    plus = tmp_path / "a+b.jsonl"  # a file whose name holds "+" is one source
    plus.write_text(json.dumps({"question": "Who?", "context": "Ann wrote it.", "answer_text": "Ann"}) + "\n")
    assert len(sources.load_examples(str(plus))[0]) == 1
