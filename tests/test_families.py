"""Exact character offsets for every tokenizer family: WordPiece (BERT), byte-level BPE (RoBERTa) and
SentencePiece/Metaspace (DeBERTa-v2), on passages that trip offsets (`tests.families`).

For each family: the windows' token offsets are clean (non-empty, no outer whitespace, in order, never
overlapping), labels decode to the gold answer character for character, every n-best span slices the context
exactly, and `Answerer`, `predict.py`, `evaluate.py`, the service and an ONNX export answer with
`context[start:end] == answer`. The models are untrained, so their answers are arbitrary: the offsets must be exact.
"""

from __future__ import annotations

import itertools
import json
from typing import Any

import numpy as np
import pytest

from bertqa.data import Features, Window, check_labels, label_features, tokenize_examples
from bertqa.deploy.serving import Answerer
from bertqa.model import build_tokenizer
from bertqa.postprocess import postprocess
from tests.families import FAMILIES, PASSAGES, Passage, passage_examples, squad_file
from tests.test_scripts import script

by_family = pytest.mark.parametrize("family", FAMILIES)

# Every passage in one long context, cut into many small windows: answers land in later windows, and windows cut
# through the tricky spots.
LONG = Passage(" ".join(p.context for p in PASSAGES), "What is it?", tuple(a for p in PASSAGES for a in p.answers))
SMALL_WINDOWS = Window(max_seq_length=64, doc_stride=16, max_query_length=16)
DEFAULT_WINDOW = Window()


@pytest.fixture(scope="module")
def tokenizers(family_dirs):
    return {family: build_tokenizer(folder) for family, folder in family_dirs.items()}


def windows(tokenizer, examples, window: Window = DEFAULT_WINDOW) -> Features:
    return label_features(tokenize_examples(examples, tokenizer, window), examples)


def records(passages=PASSAGES) -> list[dict[str, str]]:
    return [{"id": ex.id, "question": ex.question, "context": ex.context} for ex in passage_examples(passages)]


def assert_exact(context: str, text: str, start: int | None, end: int | None) -> None:
    """A span's text is the context's characters start:end, non-empty, with no whitespace around it."""
    assert start is not None and end is not None, text
    assert context[start:end] == text, (context, start, end, text)
    assert text and text == text.strip(), repr(text)


# -------------------------------------------------------------------------------------------------- windows, labels


def raw_offsets(tokenizer, passage: Passage) -> list[tuple[int, int]]:
    """The tokenizer's own offsets of the context tokens, as it gives them."""
    enc = tokenizer(passage.question, passage.context, return_offsets_mapping=True)
    return [tuple(o) for o, s in zip(enc["offset_mapping"], enc.sequence_ids()) if s == 1]


def test_the_families_have_the_offset_problems(tokenizers):
    """What each family's own offsets get wrong on the passages, so the tests below check that windows fix it."""
    raw = {family: [raw_offsets(tokenizer, p) for p in PASSAGES] for family, tokenizer in tokenizers.items()}
    cafe, cjk = PASSAGES[0].context, PASSAGES[1].context
    accent = cafe.index("\u0301")
    for family in ("bert", "deberta-v2"):  # stripped or composed away: no token holds the decomposed accent
        assert not any(a <= accent < b for a, b in raw[family][0])
    spans = [span for offsets in raw["roberta"] for span in offsets]
    assert any(a == b for a, b in spans)  # a lone space token: an empty span
    assert any(b > c for (a, b), (c, d) in itertools.pairwise(raw["roberta"][1]))  # bytes of one CJK character
    starts = [cafe[a] for a, b in raw["deberta-v2"][0]]
    assert " " in starts  # the space a "▁" stands for
    assert raw["deberta-v2"][1][0] == raw["deberta-v2"][1][1] == (0, 1) and cjk[0] == "東"  # a lone "▁" on "東"


class EmptySpansAtZero:
    """A fast tokenizer whose question-and-context tokens with an empty span get (0, 0) instead, as some tokenizers
    give the tokens they add (a space before the text, a lone "▁")."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def __getattr__(self, name: str) -> Any:
        return getattr(self.tokenizer, name)

    def __call__(self, *texts: Any, **kwargs: Any) -> Any:
        enc = self.tokenizer(*texts, **kwargs)
        for row in enc["offset_mapping"] if len(texts) == 2 else []:
            row[:] = [(0, 0) if a == b else (a, b) for a, b in row]
        return enc


@pytest.mark.parametrize(("passages", "window"), [(PASSAGES, Window()), ((LONG,), SMALL_WINDOWS)], ids=["one", "long"])
def test_tokens_with_zero_offsets_inside_the_context_hold_nothing(tokenizers, passages, window):
    examples = passage_examples(passages)
    plain = windows(tokenizers["roberta"], examples, window)
    zeroed = windows(EmptySpansAtZero(tokenizers["roberta"]), examples, window)
    assert np.array_equal(plain.token_offsets, zeroed.token_offsets)
    assert np.array_equal(plain.start_positions, zeroed.start_positions)
    assert np.array_equal(plain.end_positions, zeroed.end_positions)


@by_family
@pytest.mark.parametrize(("passages", "window"), [(PASSAGES, Window()), ((LONG,), SMALL_WINDOWS)], ids=["one", "long"])
def test_context_token_offsets_are_clean(tokenizers, family, passages, window):
    examples = passage_examples(passages)
    features = windows(tokenizers[family], examples, window)
    for i in range(len(features)):
        context = examples[features.example_index[i]].context
        offs = features.offsets[i][features.offsets[i][:, 0] >= 0]
        assert len(offs), "a window without context tokens"
        assert np.all(offs[:, 0] < offs[:, 1]), "an empty span"
        assert np.all(offs[1:, 0] >= offs[:-1, 1]), "spans that overlap or go back"
        for a, b in offs.tolist():
            assert not context[a].isspace() and not context[b - 1].isspace(), repr(context[a:b])


@by_family
@pytest.mark.parametrize(("passages", "window"), [(PASSAGES, Window()), ((LONG,), SMALL_WINDOWS)], ids=["one", "long"])
def test_labels_decode_to_the_gold_answer_exactly(tokenizers, family, passages, window):
    examples = passage_examples(passages)
    features = windows(tokenizers[family], examples, window)
    labelled = set()
    for i in range(len(features)):
        s, e = int(features.start_positions[i]), int(features.end_positions[i])
        if s == e == features.cls_index[i]:
            continue
        ex = examples[features.example_index[i]]
        offs = features.offsets[i]
        assert ex.context[offs[s, 0] : offs[e, 1]] == ex.answer_texts[0], (family, ex.id)
        labelled.add(ex.id)
    assert labelled == {ex.id for ex in examples}  # every answer is labelled in some window
    report = check_labels(features, examples)
    assert report.match_rate == 1.0 and report.n_unreachable == 0


# ------------------------------------------------------------------------------------------------- post-processing


@by_family
@pytest.mark.parametrize(("passages", "window"), [(PASSAGES, Window()), ((LONG,), SMALL_WINDOWS)], ids=["one", "long"])
def test_every_candidate_span_slices_the_context(tokenizers, family, passages, window):
    examples = passage_examples(passages)
    features = windows(tokenizers[family], examples, window)
    length = int(features.lengths.max())
    rng = np.random.default_rng(0)
    for _ in range(3):
        start, end = (rng.normal(size=(len(features), length)).astype(np.float32) for _ in range(2))
        preds = postprocess(examples, features, start, end, n_best=50)
        for ex in examples:
            assert preds[ex.id].nbest
            for span in preds[ex.id].spans():
                assert_exact(ex.context, span.text, span.start, span.end)


@by_family
def test_the_labelled_span_comes_back_as_the_gold_answer(tokenizers, family):
    """Logits that peak on a window's labels (what a model that learned them gives) answer the gold text."""
    examples = passage_examples()
    features = windows(tokenizers[family], examples)
    length = int(features.lengths.max())
    start, end = np.zeros((2, len(features), length), dtype=np.float32)
    rows = np.arange(len(features))
    start[rows, features.start_positions] = end[rows, features.end_positions] = 10.0
    preds = postprocess(examples, features, start, end)
    assert {ex.id: preds[ex.id].text for ex in examples} == {ex.id: ex.answer_texts[0] for ex in examples}


# ------------------------------------------------------------------------------------------------------- answering


@by_family
def test_answerer_answers_with_exact_offsets(family_dirs, family):
    questions = records()
    answers = Answerer(family_dirs[family], precision="no")(questions, top_k=5)
    for q, a in zip(questions, answers):
        assert a.id == q["id"]
        assert_exact(q["context"], a.answer, a.start, a.end)
        for c in a.top_k:
            assert_exact(q["context"], c["answer"], c["start"], c["end"])


@by_family
def test_the_service_answers_with_exact_offsets(family_dirs, family):
    from fastapi.testclient import TestClient

    from bertqa.deploy.service import create_app

    questions = records()
    with TestClient(create_app(Answerer(family_dirs[family], precision="no"))) as client:
        reply = client.post("/answer?top_k=3", json=questions)
    assert reply.status_code == 200, reply.text
    for q, a in zip(questions, reply.json()):
        assert a["id"] == q["id"]
        assert_exact(q["context"], a["answer"], a["start"], a["end"])
        for c in a["top_k"]:
            assert_exact(q["context"], c["answer"], c["start"], c["end"])


# ----------------------------------------------------------------------------------------------------- end to end


@pytest.mark.e2e
@by_family
def test_predict_script_answers_with_exact_offsets(family_dirs, family):
    p = PASSAGES[2]
    out = script("predict.py", family_dirs[family], "-q", p.question, "-c", p.context, "--top-k", "3")
    answer = json.loads(out.stdout)
    assert_exact(p.context, answer["answer"], answer["start"], answer["end"])
    for c in answer["top_k"]:
        assert_exact(p.context, c["answer"], c["start"], c["end"])


@pytest.mark.e2e
@by_family
def test_evaluate_script_writes_exact_spans(family_dirs, family, tmp_path):
    data = squad_file(tmp_path / "tricky.json")
    script("evaluate.py", family_dirs[family], "--data", data, "--out", tmp_path / "eval")
    contexts = {ex.id: ex.context for ex in passage_examples()}
    predictions = json.loads((tmp_path / "eval" / "predictions.json").read_text())
    nbest = json.loads((tmp_path / "eval" / "nbest_predictions.json").read_text())
    assert set(predictions) == set(nbest) == set(contexts)
    for qid, spans in nbest.items():
        assert spans and spans[0]["text"] == predictions[qid]
        for span in spans:
            assert_exact(contexts[qid], span["text"], span["start"], span["end"])
    assert json.loads((tmp_path / "eval" / "scores.json").read_text())["f1"] >= 0


@pytest.mark.e2e
@by_family
def test_onnx_export_answers_with_exact_offsets(family_dirs, family, tmp_path):
    data = squad_file(tmp_path / "tricky.json")
    out = tmp_path / "onnx"
    script("export.py", family_dirs[family], out, "--format", "onnx", "--check-data", data, "--check-questions", "8")
    questions = records()
    exported, source = Answerer(out), Answerer(family_dirs[family], precision="no")
    assert exported.backend == "onnx-fp32"
    for q, a, t in zip(questions, exported(questions, top_k=3), source(questions, top_k=3)):
        assert_exact(q["context"], a.answer, a.start, a.end)
        assert (a.answer, a.start, a.end) == (t.answer, t.start, t.end)
