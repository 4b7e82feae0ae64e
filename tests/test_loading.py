"""Loading your own data: every format gives the same examples as the nested SQuAD JSON, column maps, generated
ids, held-out evaluation data, and errors that say what is wrong and where."""

from __future__ import annotations

import gzip
import json

import pytest

from bertqa import data, sources
from bertqa.examples import SquadFormatError, examples_from_records, parse_column_map
from bertqa.loading import BUNDLED, load_squad
from bertqa.sources import eval_source


@pytest.fixture(scope="module")
def nested(tmp_path_factory):
    """A slice of the real v2 dev set (answerable and unanswerable, several answers each) in the official layout."""
    raw = json.loads(gzip.decompress(BUNDLED["dev-v2.0"].read_bytes()))
    raw["data"] = [dict(a, paragraphs=a["paragraphs"][:3]) for a in raw["data"][:3]]
    path = tmp_path_factory.mktemp("nested") / "squad.json"
    path.write_text(json.dumps(raw))
    return path


def flat_records(path):
    """The HF `squad` schema: one record per question."""
    raw = json.loads(path.read_text())
    for article in raw["data"]:
        for paragraph in article["paragraphs"]:
            for qa in paragraph["qas"]:
                answers = {
                    "text": [a["text"] for a in qa["answers"]],
                    "answer_start": [a["answer_start"] for a in qa["answers"]],
                }
                yield {"id": qa["id"], "title": article["title"], "context": paragraph["context"],
                       "question": qa["question"], "answers": answers}  # fmt: skip


def test_every_format_gives_the_same_examples(nested, tmp_path):
    import pandas as pd

    expected, report = load_squad(nested)
    assert report.n_impossible > 0 and max(len(ex.answer_texts) for ex in expected) > 1
    records = list(flat_records(nested))
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (tmp_path / "a.json").write_text(json.dumps(records))
    pd.DataFrame(records).to_parquet(tmp_path / "a.parquet")
    # CSV cells are text: the answers object is stored as JSON text.
    pd.DataFrame([{**r, "answers": json.dumps(r["answers"])} for r in records]).to_csv(tmp_path / "a.csv", index=False)
    with gzip.open(tmp_path / "a.jsonl.gz", "wt") as f:
        f.write((tmp_path / "a.jsonl").read_text())
    for name in ("a.jsonl", "a.json", "a.parquet", "a.csv", "a.jsonl.gz"):
        examples, got = load_squad(tmp_path / name)
        assert examples == expected, name
        assert (got.n_examples, got.n_impossible, got.version) == (report.n_examples, report.n_impossible, "v2.0")


def test_a_datasets_object_and_the_single_answer_layout(nested):
    import datasets

    expected, _ = load_squad(nested)
    records = list(flat_records(nested))
    assert load_squad(datasets.Dataset.from_list(records))[0] == expected
    single = [{"qid": r["id"], "title": r["title"], "passage": r["context"], "query": r["question"],
               "gold": (r["answers"]["text"] or [""])[0], "gold_start": (r["answers"]["answer_start"] or [None])[0]}
              for r in records]  # fmt: skip
    mapping = "id=qid,context=passage,question=query,answer_text=gold,answer_start=gold_start"
    examples, _ = load_squad(datasets.Dataset.from_list(single), column_map=mapping)
    assert [ex.answer_texts[:1] for ex in examples] == [ex.answer_texts[:1] for ex in expected]
    assert [(ex.id, ex.is_impossible, ex.answer_starts[:1]) for ex in examples] == [
        (ex.id, ex.is_impossible, ex.answer_starts[:1]) for ex in expected
    ]


def test_csv_with_a_column_map_keeps_ids_as_text_and_locates_missing_starts(tmp_path):
    path = tmp_path / "mine.csv"
    path.write_text(
        "qid,passage,query,gold\n"
        '007,"Paris is the capital of France.",What is the capital?,Paris\n'
        '008,"Rome, not Paris, is in Italy.",Which city is in Italy?,Rome\n'
        '009,"Nothing here.",Who?,\n'
    )
    examples, report = sources.load_examples(path, column_map="id=qid,context=passage,question=query,answer_text=gold")
    assert [ex.id for ex in examples] == ["007", "008", "009"]
    assert examples[1].answer_starts == (0,) and examples[2].is_impossible
    assert report.n_located == 2 and report.n_impossible == 1 and report.version == "v2.0"


def test_generated_ids_are_stable_and_unique(tmp_path):
    rows = [{"context": "Ann wrote it.", "question": "Who wrote it?", "answer_text": "Ann"}] * 2
    rows.append({"context": "Bo ran.", "question": "Who ran?", "answer_text": "Bo"})
    columns = {k: [r[k] for r in rows] for k in rows[0]}
    first, report = examples_from_records(columns, source="s")
    again, _ = examples_from_records(columns, source="s")
    ids = [ex.id for ex in first]
    assert ids == [ex.id for ex in again] and len(set(ids)) == 3 and ids[1] == ids[0] + "-2"
    assert report.n_generated_ids == 3


def test_held_out_split_is_seeded_and_shares_no_article():
    examples, _ = sources.load_examples("dev-v1.1")
    kept, held = sources.hold_out(examples, 0.1, seed=1)
    assert len(kept) + len(held) == len(examples) and 0.1 <= len(held) / len(examples) < 0.2
    assert not {ex.title for ex in kept} & {ex.title for ex in held}
    assert sources.hold_out(examples, 0.1, seed=1) == (kept, held) and sources.hold_out(examples, 0.1, seed=2) != (
        kept,
        held,
    )
    untitled = [data.Example(ex.id, "", ex.context, ex.question, ex.answer_texts, ex.answer_starts) for ex in examples]
    kept, held = sources.hold_out(untitled, 0.1, seed=1)
    assert not {ex.context for ex in kept} & {ex.context for ex in held}  # grouped by passage when there are no titles


def test_which_evaluation_data_a_config_means():
    assert eval_source("train-v1.1", None, None) == "dev-v1.1"
    assert eval_source("mine.jsonl", None, None) == 0.1
    assert eval_source("mine.jsonl", None, 0.2) == 0.2
    assert eval_source("mine.jsonl", "dev.jsonl", None) == "dev.jsonl"


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("a.txt", "x", r"unknown data format; accepted: \.json, \.jsonl, \.csv, \.parquet"),
        ("a.jsonl", "", r"a\.jsonl: the file is empty"),
        (
            "a.jsonl",
            '{"context": "a b", "question": "q", "answer_text": "a"}\n\n{"context": "a",\n',
            r"a\.jsonl: line 3 is not valid JSON",
        ),
        ("a.jsonl", b'{"context": "caf\xe9"}\n', r"a\.jsonl: not UTF-8 text: byte 16 \(line 1\)"),
        (
            "a.jsonl",
            '{"passage": "a b", "question": "q", "answer_text": "a"}\n',
            r"missing column 'context'.*--column-map",
        ),
        ("a.csv", "context,question,answer_text,answer_start\na b,q,a,x\n", r"a\.csv: line 2: column 'answer_start'"),
        (
            "a.csv",
            "context,question,answer_text\na b,,a\n",
            r"a\.csv: line 2 \(id|a\.csv: line 2: column 'question' is empty",
        ),
        (
            "a.json",
            '[{"id": "x", "context": "", "question": "q", "answer_text": "a"}]',
            r"record 0 \(id 'x'\): column 'context' is empty",
        ),
        (
            "a.json",
            '[{"id": "x", "context": "a b", "question": "q", "answer_text": "zz"}]',
            r"'x' answer 0 'zz'.*does not occur",
        ),
    ],
)
def test_bad_files_name_the_problem_and_the_place(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(SquadFormatError, match=message):
        load_squad(path)


def test_column_map_errors_name_the_flag_and_the_columns():
    with pytest.raises(ValueError, match="not NAME=COLUMN"):
        parse_column_map("context")
    with pytest.raises(ValueError, match="unknown columns \\['passage'\\]"):
        parse_column_map("passage=context")
    with pytest.raises(SquadFormatError, match="names columns that are not there \\(context=body\\)"):
        examples_from_records(
            {"passage": ["a"], "question": ["q"], "answer_text": ["a"]}, source="s", column_map={"context": "body"}
        )


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        # A misspelt key on one line must not quietly make that question unanswerable.
        (
            "a.jsonl",
            '{"context": "a b", "question": "q", "answers": {"text": ["a"], "answer_start": [0]}}\n'
            '{"context": "a b", "question": "q2", "answer": {"text": ["b"], "answer_start": [2]}}\n',
            r"a\.jsonl: line 2: column 'answers' is missing or null",
        ),
        (
            "a.jsonl",
            '{"id": "x", "context": "a b", "question": "q", "answers": {"text": ["a"], "answer_start": [0]}}\n'
            '\n{"id": "x", "context": "a b", "question": "q2", "answers": {"text": ["b"], "answer_start": [2]}}\n',
            r"a\.jsonl: line 3 \(id 'x'\): question id 'x' appears twice \(first at .*line 1",
        ),
        (
            "a.jsonl",
            '{"context": "a b", "question": "q", "answers": {"text": ["zz"], "answer_start": [0]}}\n',
            r"a\.jsonl: line 1: question '[0-9a-f]+' answer 0 'zz'.*does not occur",
        ),
        (
            "a.csv",
            'id,context,question,answer_text\n1,"one\ntwo\nthree",q,one\n2,"x y",q,\n3,"a b",,a\n',
            r"a\.csv: line 6 \(id '3'\): column 'question' is empty",
        ),  # a quoted cell spans lines 2-4
        (
            "a.jsonl",
            '{"context": "a b", "answers": {"text": ["a"], "answer_start": [0]}}\n',
            r"missing column 'question'",
        ),
        (
            "a.json",
            '{"version": "1.1", "data": [{"title": "T", "paragraphs": [{"context": "a b", "qas": '
            '[{"id": "q", "question": "q?", "answers": [{"text": "a", "answer_start": -3}]}]}]}]}',
            r"answer_start must be >= 0",
        ),
        ("a.txt", "x", r"a bundled name \(train-v1\.1, dev-v1\.1, dev-v2\.0\)"),
    ],
)
def test_more_bad_files_name_the_problem_and_the_place(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(SquadFormatError, match=message):
        load_squad(path)


def test_a_spreadsheet_csv_with_a_byte_order_mark_loads(tmp_path):
    path = tmp_path / "excel.csv"
    path.write_bytes(b'\xef\xbb\xbfcontext,question,answer_text\n"Caf\xc3\xa9 au lait, please.",What?,Caf\xc3\xa9\n')
    (example,), report = load_squad(path)
    assert example.answer_texts == ("Café",) and example.answer_starts == (0,) and report.n_located == 1
