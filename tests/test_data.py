"""Data layer: loading and validation, filtering, windows, labels and the label self-check."""

from __future__ import annotations

import gzip
import itertools
import json
import re
import unicodedata

import numpy as np
import pytest

from bertqa import data, loading, sources
from bertqa.data import Example, Window
from bertqa.examples import SquadFormatError
from bertqa.metrics import normalize_answer

DEFAULT_WINDOW = Window()


def make_example(context: str, answer: str | None, *, question: str = "What is it?", occurrence: int = 0) -> Example:
    if answer is None:
        return Example("q", "t", context, question, (), (), True)
    start = -1
    for _ in range(occurrence + 1):
        start = context.index(answer, start + 1)
    return Example("q", "t", context, question, (answer,), (start,), False)


def labelled(examples, tokenizer, window=DEFAULT_WINDOW):
    features = data.tokenize_examples(examples, tokenizer, window)
    return data.label_features(features, examples)


def decoded(features, examples, i):
    s, e = features.start_positions[i], features.end_positions[i]
    offs = features.offsets[i]
    return examples[features.example_index[i]].context[offs[s, 0] : offs[e, 1]]


def is_cls(features, i):
    return features.start_positions[i] == features.cls_index[i] == features.end_positions[i]


# ---------------------------------------------------------------------------------------------------------- loading


def squad_json(qas, context="Paris is the capital of France.", version="1.1"):
    return {"version": version, "data": [{"title": "T", "paragraphs": [{"context": context, "qas": qas}]}]}


def test_parse_official_layout():
    raw = squad_json([{"id": "a", "question": "Capital?", "answers": [{"text": "Paris", "answer_start": 0}]}])
    examples, report = loading.parse_squad(raw)
    assert examples == [Example("a", "T", raw["data"][0]["paragraphs"][0]["context"], "Capital?", ("Paris",), (0,))]
    assert (report.n_examples, report.n_answers, report.n_repaired, report.version) == (1, 1, 0, "v1.1")


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ([], "expected a JSON object with a 'data' list"),
        ({"data": [{"paragraphs": []}]}, "data[0]: missing key 'title'"),
        (squad_json([{"id": "a", "answers": []}]), "qas[0] (id 'a'): missing key 'question'"),
        (squad_json([{"id": "a", "question": "q", "answers": [{"text": "x"}]}]), "missing key 'answer_start'"),
        (squad_json([{"id": "a", "question": "q", "answers": "Paris"}]), "answers: expected list, got str"),
        (squad_json([{"id": "a", "question": "q", "answers": []}]), "has no answers but is not marked"),
    ],
)
def test_malformed_files_name_the_problem(raw, message):
    with pytest.raises(SquadFormatError, match=re.escape(message)):
        loading.parse_squad(raw)


def test_duplicate_ids_rejected():
    qa = {"id": "a", "question": "q", "answers": [{"text": "Paris", "answer_start": 0}]}
    with pytest.raises(SquadFormatError, match="appears twice"):
        loading.parse_squad(squad_json([qa, qa]))


def test_mismatched_answer_start_is_repaired_and_counted():
    context = "France: Paris. Also Paris, Texas."
    qa = {"id": "a", "question": "q", "answers": [{"text": "Paris", "answer_start": 18}]}
    examples, report = loading.parse_squad(squad_json([qa], context=context))
    assert examples[0].answer_starts == (20,)  # the nearest occurrence, not the first
    assert report.n_repaired == 1
    with pytest.raises(SquadFormatError, match="answer_start 18 points at 'o Par'"):
        loading.parse_squad(squad_json([qa], context=context), on_mismatch="error")


def test_answer_text_absent_from_context_raises():
    qa = {"id": "a", "question": "q", "answers": [{"text": "Berlin", "answer_start": 0}]}
    with pytest.raises(SquadFormatError, match="does not occur in the context"):
        loading.parse_squad(squad_json([qa]))


def test_v2_unanswerable_and_file_roundtrip(tmp_path):
    qas = [
        {"id": "a", "question": "q", "answers": [{"text": "Paris", "answer_start": 0}], "is_impossible": False},
        {"id": "b", "question": "q2", "answers": [], "is_impossible": True, "plausible_answers": []},
    ]
    path = tmp_path / "v2.json.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        json.dump(squad_json(qas, version="v2.0"), f)
    examples, report = loading.load_squad(path)
    assert [ex.is_impossible for ex in examples] == [False, True]
    assert (report.version, report.n_impossible) == ("v2.0", 1)
    assert sources.answerable_only(examples) == examples[:1]


def test_unreadable_and_missing_files(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(SquadFormatError, match=r"bad\.json: not valid JSON at line 1 column 2"):
        loading.load_squad(bad)
    with pytest.raises(FileNotFoundError, match="data file not found"):
        loading.load_squad(tmp_path / "missing.json")
    with pytest.raises(FileNotFoundError, match="not a file nor a bundled name"):
        loading.load_squad("no-such-dataset")


def test_bundled_dev_sets_load_with_official_counts():
    v1, r1 = loading.load_squad("dev-v1.1")
    v2, r2 = loading.load_squad("dev-v2.0")
    assert (r1.n_examples, r1.n_answers, r1.n_repaired) == (10570, 34726, 0)
    assert (r2.n_examples, r2.n_impossible, r2.version) == (11873, 5945, "v2.0")
    assert v1[0].id == "56be4db0acb8001400a502ec"
    assert len(sources.answerable_only(v2)) == 5928


# ------------------------------------------------------------------------------------------------------- subsample


def test_subsample_is_seeded_ordered_and_by_example():
    examples = [Example(str(i), "t", "c", "q", (), (), True) for i in range(100)]
    a = sources.subsample(examples, 10, seed=1)
    assert a == sources.subsample(examples, 10, seed=1)
    assert a != sources.subsample(examples, 10, seed=2)
    assert [int(ex.id) for ex in a] == sorted(int(ex.id) for ex in a)
    assert len(set(a)) == 10
    assert sources.subsample(examples, None, seed=0) == examples
    assert sources.subsample(examples, 1000, seed=0) == examples
    with pytest.raises(ValueError, match="positive"):
        sources.subsample(examples, 0, seed=0)


def test_article_range_splits_a_file_without_shared_articles():
    assert sources.split_article_range("dev-v2.0[:25]") == ("dev-v2.0", slice(None, 25))
    assert sources.split_article_range("squad_v2:validation[3:7]") == ("squad_v2:validation", slice(3, 7))
    assert sources.split_article_range("dev-v2.0") == ("dev-v2.0", None)
    train, _ = sources.load_examples("dev-v2.0[:25]")
    held_out, _ = sources.load_examples("dev-v2.0[25:]")
    assert (len(train), len(held_out)) == (8017, 3856)  # the 11,873 questions of the v2 dev set
    assert not {ex.title for ex in train} & {ex.title for ex in held_out}
    assert len({ex.title for ex in train}) == 25 and train[0].title == "Normans"
    assert sum(ex.is_impossible for ex in held_out) == 1905
    with pytest.raises(ValueError, match="selects no article of the 35"):
        sources.load_examples("dev-v2.0[40:]")


# --------------------------------------------------------------------------------------------------------- windows


def test_answer_at_context_start_and_end(tokenizer):
    context = "Zanzibar is an island, and its capital is Stone Town"
    examples = [make_example(context, "Zanzibar"), make_example(context, "Stone Town")]
    features = labelled(examples, tokenizer)
    assert len(features) == 2
    assert [decoded(features, examples, i) for i in range(2)] == ["Zanzibar", "Stone Town"]


def test_labels_are_token_positions_not_characters(tokenizer):
    context = "The quick brown fox jumps over the lazy dog near the riverbank."
    examples = [make_example(context, "lazy dog")]
    features = labelled(examples, tokenizer)
    start = int(features.start_positions[0])
    assert tokenizer.convert_ids_to_tokens(int(features.input_ids[0][start])) == "lazy"
    assert start != context.index("lazy")  # the notebook bug: a character offset used as a token index


def long_context(n_words: int) -> str:
    return " ".join(f"word{i}" for i in range(n_words))


def test_long_context_windows_overlap_by_stride(tokenizer):
    context = long_context(400)  # "word123" is several word pieces, so this is well over 1000 tokens
    examples = [make_example(context, "word5"), make_example(context, "word390")]
    features = labelled(examples, tokenizer, Window(64, 16, 16))
    windows = [i for i in range(len(features)) if features.example_index[i] == 0]
    assert len(windows) > 10
    # Consecutive windows share exactly doc_stride context tokens.
    for a, b in itertools.pairwise(windows):
        ctx_a = [tuple(o) for o in features.offsets[a] if o[0] >= 0]
        ctx_b = [tuple(o) for o in features.offsets[b] if o[0] >= 0]
        assert ctx_a[-16:] == ctx_b[:16]
    # "word5" lies only in the first window; every other window of that example is labelled CLS.
    labelled_windows = [i for i in windows if not is_cls(features, i)]
    assert labelled_windows == [windows[0]]
    assert all(len(ids) <= 64 for ids in features.input_ids)


def test_answer_only_in_a_later_window(tokenizer):
    context = long_context(200)
    examples = [make_example(context, "word190")]
    features = labelled(examples, tokenizer, Window(64, 16, 16))
    hits = [i for i in range(len(features)) if not is_cls(features, i)]
    assert hits and hits[0] > 0
    assert all(decoded(features, examples, i) == "word190" for i in hits)


def test_answer_crossing_a_window_boundary_gets_cls_in_the_cut_window(tokenizer):
    context = long_context(120)
    # Find a multi-token answer that the first window cuts in two.
    features = data.tokenize_examples([make_example(context, "word1")], tokenizer, Window(48, 8, 16))
    last = features.offsets[0][features.offsets[0][:, 0] >= 0][-1]
    word_start = context.rfind(" ", 0, last[1]) + 1
    answer = context[word_start : context.index(" ", last[1]) if " " in context[last[1] :] else None]
    answer += " " + context[word_start + len(answer) + 1 :].split()[0]  # two words, cut by the window end
    examples = [make_example(context, answer)]
    features = labelled(examples, tokenizer, Window(48, 8, 16))
    assert is_cls(features, 0)
    full = [i for i in range(len(features)) if not is_cls(features, i)]
    assert full and all(decoded(features, examples, i) == answer for i in full)


def test_unicode_and_odd_whitespace(tokenizer):
    context = "Der  Müller\twohnte in\u00a0Köln.\n\nSein Café heißt  «Zum Bären»  seit 1999."
    examples = [make_example(context, "Zum Bären"), make_example(context, "Köln"), make_example(context, "1999")]
    features = labelled(examples, tokenizer)
    assert [decoded(features, examples, i) for i in range(3)] == ["Zum Bären", "Köln", "1999"]


@pytest.mark.parametrize("field", ["question", "context"])
@pytest.mark.parametrize("text", ["\u200b", "\x00\x01", "\u200b\u200d \ufeff"])
def test_text_that_yields_no_tokens_is_refused_by_id(tokenizer, field, text):
    good = Example("ok", "T", "Paris is big.", "What?", ("Paris",), (0,), False)
    values = {"id": "bad-1", "title": "T", "context": "Paris is big.", "question": "What?"} | {field: text}
    bad = Example(values["id"], "T", values["context"], values["question"], (), (), True)
    with pytest.raises(ValueError, match=rf"example 'bad-1' \(title 'T'\): its {field} .*yields no tokens"):
        data.tokenize_examples([good, bad], tokenizer)
    with pytest.raises(ValueError, match="bad-1"):  # the same in worker processes
        data.tokenize_examples([good, bad], tokenizer, num_proc=2)


def test_answer_with_surrounding_whitespace_is_trimmed(tokenizer):
    context = "He was born in Warsaw in 1810."
    ex = Example("q", "t", context, "Where?", (" Warsaw ",), (context.index("Warsaw") - 1,), False)
    features = labelled([ex], tokenizer)
    assert decoded(features, [ex], 0) == "Warsaw"


def test_leading_whitespace_of_questions_stripped(tokenizer):
    context = "Paris is the capital of France."
    a = data.tokenize_examples([make_example(context, "Paris", question="   Which city?")], tokenizer)
    b = data.tokenize_examples([make_example(context, "Paris", question="Which city?")], tokenizer)
    assert a.input_ids == b.input_ids


def test_question_longer_than_its_budget_is_cut(tokenizer):
    question = "why " * 200
    examples = [make_example(long_context(50), "word7", question=question)]
    features = labelled(examples, tokenizer, Window(96, 16, 20))
    assert all(len(ids) <= 96 for ids in features.input_ids)
    n_question = features.input_ids[0].tolist().index(tokenizer.sep_token_id) - 1
    assert n_question == 20
    assert decoded(features, examples, 0) == "word7"


def test_unanswerable_is_cls_in_every_window(tokenizer):
    examples = [make_example(long_context(150), None)]
    features = labelled(examples, tokenizer, Window(64, 16, 16))
    assert len(features) > 1
    assert all(is_cls(features, i) for i in range(len(features)))
    assert np.all(features.cls_index == 0)


def test_offsets_are_minus_one_outside_the_context(tokenizer):
    features = data.tokenize_examples([make_example("Paris is in France.", "Paris")], tokenizer)
    offs = features.offsets[0]
    sep = features.input_ids[0].tolist().index(tokenizer.sep_token_id)
    assert np.all(offs[: sep + 1] == -1) and np.all(offs[-1] == -1)
    assert np.all(offs[sep + 1 : -1, 0] >= 0)


@pytest.mark.parametrize(("stride", "max_len"), [(128, 128), (400, 384), (317, 384), (-1, 384)])
def test_bad_stride_is_a_clear_value_error(tokenizer, stride, max_len):
    with pytest.raises(ValueError, match=r"doc_stride|no room"):
        data.tokenize_examples([make_example("a b", "a")], tokenizer, Window(max_len, stride, 64))


def test_largest_allowed_stride_works(tokenizer):
    # 384 - 64 - 3 = 317 tokens of room; stride 316 is the largest that still moves forward.
    examples = [make_example(long_context(300), "word280")]
    features = labelled(examples, tokenizer, Window(384, 316))
    assert any(not is_cls(features, i) for i in range(len(features)))


def test_slow_tokenizer_rejected():
    class Slow:
        is_fast = False

    with pytest.raises(TypeError, match="fast tokenizer"):
        data.tokenize_examples([make_example("a b", "a")], Slow())


# ------------------------------------------------------------------------------------------------ label self-check


def test_label_check_catches_character_offsets_used_as_tokens(tokenizer):
    context = "In 1858 the Virgin Mary appeared to Saint Bernadette Soubirous in Lourdes, France, many times over."
    examples = [make_example(context, w) for w in ("Saint Bernadette Soubirous", "Lourdes", "France", "1858")]
    features = labelled(examples, tokenizer)
    report = data.check_labels(features, examples)
    assert report.match_rate == 1.0 and report.n_labelled == 4
    # The course notebook's bug: character positions fed as token positions.
    features.start_positions = np.array([ex.answer_starts[0] for ex in examples]) % 40
    features.end_positions = features.start_positions + 2
    with pytest.raises(ValueError, match="label self-check failed"):
        data.check_labels(features, examples)


def test_label_check_reports_windows_and_cls_share(tokenizer):
    examples = [make_example(long_context(150), "word100"), make_example("Paris is big.", None)]
    features = labelled(examples, tokenizer, Window(64, 16, 16))
    report = data.check_labels(features, examples)
    assert report.n_examples == 2 and report.n_features == len(features)
    assert report.max_windows == int(np.bincount(features.example_index).max())
    assert 0 < report.cls_share < 1 and report.n_unreachable == 0
    assert "decode to the gold answer" in report.format()


def test_real_dev_set_labels_decode_to_gold(tokenizer):
    examples, _ = loading.load_squad("dev-v1.1")
    examples = sources.subsample(examples, 2000, seed=0)
    features = labelled(examples, tokenizer)
    report = data.check_labels(features, examples)
    assert report.match_rate >= 0.995, report.format()
    assert report.n_unreachable == 0
    # Spot-check with an independent decoder: the tokenizer's own decode of the labelled ids.
    for i in range(0, len(features), 97):
        if not is_cls(features, i):
            s, e = features.start_positions[i], features.end_positions[i]
            text = tokenizer.decode(features.input_ids[i][s : e + 1].tolist())
            gold = examples[features.example_index[i]].answer_texts[0]
            same = squash(text) == squash(gold)
            # Where the tokenizer's decode disagrees, the offset decode must disagree too (a real boundary issue).
            assert same or normalize_answer(decoded(features, examples, i)) != normalize_answer(gold)


def squash(text: str) -> str:
    """Normalised, accent-free, space-free text: what an uncased WordPiece decode can be compared on."""
    text = unicodedata.normalize("NFD", normalize_answer(text))
    return "".join(ch for ch in text if not unicodedata.combining(ch) and not ch.isspace())


def test_tokenizing_in_processes_gives_the_same_windows(tokenizer):
    examples, _ = sources.load_examples("dev-v2.0", max_examples=60, seed=4)
    context = " ".join(f"w{i}" for i in range(500))
    examples = [*examples, Example("long", "t", context, "Which?", ("w250",), (context.index("w250 "),))]
    one = data.tokenize_examples(examples, tokenizer, Window(128, 32))
    three = data.tokenize_examples(examples, tokenizer, Window(128, 32), num_proc=3)
    assert len(one) > len(examples)  # the long context spans several windows
    assert one.input_ids == three.input_ids and one.token_type_ids == three.token_type_ids
    assert all(np.array_equal(a, b) for a, b in zip(one.offsets, three.offsets))
    assert np.array_equal(one.example_index, three.example_index) and np.array_equal(one.cls_index, three.cls_index)
