"""Loading your own data: every format gives the same examples as the nested SQuAD JSON, column maps, generated
ids, held-out evaluation data, and errors that say what is wrong and where."""

from __future__ import annotations

import gzip
import json
import re

import pytest

from bertqa import data, sources
from bertqa.examples import SquadFormatError, examples_from_records, parse_column_map
from bertqa.loading import BUNDLED, given_examples, load_squad
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
                yield {
                    "id": qa["id"],
                    "title": article["title"],
                    "context": paragraph["context"],
                    "question": qa["question"],
                    "answers": answers,
                }


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
    single = [
        {
            "qid": r["id"],
            "title": r["title"],
            "passage": r["context"],
            "query": r["question"],
            "gold": (r["answers"]["text"] or [""])[0],
            "gold_start": (r["answers"]["answer_start"] or [None])[0],
        }
        for r in records
    ]
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


# ------------------------------------------------------------------------------------------- small data, records

README_RECORDS = [
    {
        "id": "q1",
        "title": "Paris",
        "context": "Paris is the capital of France.",
        "question": "What is the capital of France?",
        "answers": {"text": ["Paris"], "answer_start": [0]},
    },
    {
        "context": "The book was written by Ann Lee in 1990.",
        "question": "Who wrote the book?",
        "answers": {"text": ["Ann Lee"], "answer_start": [24]},
    },
    {
        "context": "The book was written by Ann Lee in 1990.",
        "question": "Who published it?",
        "answers": {"text": [], "answer_start": []},
    },
]


def test_records_given_from_python_are_checked_as_a_files_records_are():
    examples, report = given_examples(README_RECORDS, name="train_examples")
    assert [ex.question for ex in examples] == [r["question"] for r in README_RECORDS]
    assert examples[0].id == "q1" and examples[2].is_impossible and report.n_generated_ids == 2
    flat = [{"context": "It was written by Ann Lee.", "question": "Who?", "answer_text": "Ann Lee"}]
    assert given_examples(flat)[0][0].answer_starts == (18,)  # located by its text
    with pytest.raises(SquadFormatError, match=r"train_examples: record 1 \(id 'b'\).*'question' is missing"):
        given_examples(
            [{**README_RECORDS[0], "id": "a"}, {"id": "b", "context": "x", "answers": {"text": []}}],
            name="train_examples",
        )
    with pytest.raises(TypeError, match=r"train_examples\[1\] is a str; give bertqa.examples.Example"):
        given_examples([README_RECORDS[0], "What is it?"], name="train_examples")
    with pytest.raises(TypeError, match=r"a path or source name goes in TrainConfig\.train_data"):
        given_examples("mine.jsonl")
    with pytest.raises(ValueError, match="no examples were given"):
        given_examples([])


def test_small_data_is_held_out_by_passage_when_whole_articles_cannot_be(caplog):
    examples, _ = sources.load_examples("dev-v1.1[:1]")  # one article, many passages
    kept, held = sources.hold_out(examples, 0.1, seed=0)
    assert kept and held and not {ex.context for ex in kept} & {ex.context for ex in held}
    assert 0.05 < len(held) / len(examples) < 0.3
    assert "held out by passage, not by article (one article)" in caplog.text
    two, _ = sources.load_examples("dev-v2.0[:2]")  # whole articles would hold out about half
    kept, held = sources.hold_out(two, 0.1, seed=0)
    assert len(held) / len(two) < 0.2 and not {ex.context for ex in kept} & {ex.context for ex in held}
    one_passage = [ex for ex in examples if ex.context == examples[0].context]
    with pytest.raises(
        sources.HoldOutError, match=r"all \d+ examples are of one passage.*name evaluation data instead \(--eval-data"
    ):
        sources.hold_out(one_passage, 0.1, seed=0)


def test_every_split_of_small_v2_data_works_and_says_what_it_held_out(caplog):
    run = sources.run_examples("dev-v2.0[:2]")
    assert run.train and run.eval and run.calibration and run.calibration_off is None
    sides = [{ex.context for ex in side} for side in (run.train, run.eval, run.calibration)]
    assert not (sides[0] & sides[1] or sides[0] & sides[2] or sides[1] & sides[2])
    assert len(run.train) + len(run.eval) + len(run.calibration) == 626
    off = sources.run_examples("dev-v2.0[:2]", calibration_split=0)
    assert not off.calibration and off.calibration_off == "calibration_split is 0"
    assert len(off.train) + len(off.eval) == 626
    assert "not calibrated (calibration_split is 0): the default 0 is used" in caplog.text


def test_the_readme_records_make_a_run_with_a_stated_policy(tmp_path, caplog):
    path = tmp_path / "mine.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in README_RECORDS))
    for seed in range(6):  # whichever side each passage falls on
        run = sources.run_examples(str(path), seed=seed)
        assert run.train and run.eval and len(run.train) + len(run.eval) + len(run.calibration) == 3
        assert run.calibration_off is None or "one passage" in run.calibration_off


def test_own_training_examples_are_not_scored_on_the_bundled_dev_set_by_default(caplog):
    examples, _ = sources.load_examples("dev-v1.1[:3]")
    run = sources.run_examples("train-v1.1", train_examples=examples)
    assert run.eval and {ex.id for ex in run.eval} <= {ex.id for ex in examples}
    assert "no evaluation data was given with the training examples: 10% of them is held out" in caplog.text
    named = sources.run_examples("train-v1.1", train_examples=examples, eval_data="dev-v1.1[3:4]")
    assert named.train == examples and named.eval_data == "dev-v1.1[3:4]"


def test_an_article_range_is_reported_on_its_own(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in README_RECORDS))
    _, first = sources.load_examples(f"{path}[:1]")
    assert (first.n_examples, first.version, first.n_generated_ids) == (1, "v1.1", 0)
    assert first.source.endswith("mine.jsonl[:1]")
    _, rest = sources.load_examples(f"{path}[1:]")
    assert (rest.n_examples, rest.n_impossible, rest.version, rest.n_generated_ids) == (2, 1, "v2.0", 2)


def test_repairs_are_named_and_a_column_that_looks_wrong_is_warned_about(tmp_path):
    path = tmp_path / "mine.csv"
    rows = [
        ("001", "Paris is the capital of France.", "What is the capital?", "Paris", 0, 5),
        ("002", "The book was written by Ann Lee.", "Who wrote it?", "Ann Lee", 24, 3),
    ]
    path.write_text(
        "qid,passage,query,gold,gold_start,other\n"
        + "".join(",".join(f'"{v}"' if isinstance(v, str) else str(v) for v in row) + "\n" for row in rows)
    )
    mapping = "id=qid,context=passage,question=query,answer_text=gold,answer_start="
    _, good = sources.load_examples(str(path), column_map=mapping + "gold_start")
    assert good.n_repaired == 0 and not good.warnings
    _, wrong = sources.load_examples(str(path), column_map=mapping + "other")
    assert wrong.n_repaired == 2
    assert "mine.csv: line 2 (id '001')" in wrong.warnings[0] and "moved to 0" in wrong.warnings[0]
    assert "2 of the 2 answer offsets given (100%)" in wrong.warnings[-1] and "--column-map" in wrong.warnings[-1]


@pytest.mark.parametrize(
    ("answers", "message"),
    [
        ({"text": "Ann Lee"}, r"'text' must be a list \(one entry per answer\), got 'Ann Lee'"),
        ({"text": ["Ann Lee"], "answer_start": 24}, r"'answer_start' must be a list \(one entry per answer\), got 24"),
        ({"text": ["Ann Lee"], "answer_start": [float("inf")]}, "answer_start must be a whole number >= 0, got inf"),
        ("Ann Lee", r"not JSON \(Expecting value\); it holds \{'text'"),
        ({"text": [" "], "answer_start": [0]}, "an answer text must be non-blank text, got ' '"),
        ({"text": ["Cafe\u0301"], "answer_start": [0]}, "once both are Unicode-normalised"),
    ],
)
def test_answers_of_the_wrong_shape_are_refused_naming_the_record(answers, message):
    record = {"id": "a", "context": "Café Ann Lee wrote it.", "question": "Who?", "answers": answers}
    with pytest.raises(SquadFormatError, match=r"train_examples: record 0 \(id 'a'\).*" + message):
        given_examples([record], name="train_examples")


def test_a_range_counts_each_repaired_answer_as_the_whole_file_does(tmp_path):
    records = [
        {
            "id": "a",
            "title": "One",
            "context": "Ann and Bo met.",
            "question": "Who?",
            "answers": {"text": ["Ann", "Bo"], "answer_start": [3, 0]},
        },  # both offsets wrong
        {
            "id": "b",
            "title": "Two",
            "context": "It was 1990.",
            "question": "When?",
            "answers": {"text": ["1990"], "answer_start": [0]},
        },
    ]
    path = tmp_path / "mine.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    _, whole = sources.load_examples(str(path))
    _, first = sources.load_examples(f"{path}[:1]")
    _, second = sources.load_examples(f"{path}[1:]")
    assert (whole.n_repaired, first.n_repaired, second.n_repaired) == (3, 2, 1)


# ------------------------------------------------------------------------------------- bad records, ambiguous answers


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


GOOD = {"context": "Ann Lee wrote it in 1990.", "question": "Who wrote it?", "answer_text": "Ann Lee"}


@pytest.mark.parametrize("skip", [False, True])
def test_bad_records_stop_the_load_or_are_skipped_counted_and_named(tmp_path, skip):
    path = _jsonl(
        tmp_path / "mine.jsonl",
        [
            {"id": "q1", **GOOD},
            {"id": "q2", **GOOD, "context": "  "},  # an empty context: line 2
            {"id": "q3", **GOOD, "answer_text": "Bo"},  # an answer that is not in its context: line 3
            {"id": "q1", **GOOD, "question": "Who?"},  # an id given twice: line 4
            {"id": "q5", **GOOD},
        ],
    )
    if not skip:
        with pytest.raises(SquadFormatError, match=r"mine.jsonl: line 2 \(id 'q2'\).*'context' is empty"):
            sources.load_examples(str(path))
        return
    examples, report = sources.load_examples(str(path), skip_bad_records=True)
    assert [ex.id for ex in examples] == ["q1", "q5"]
    assert report.n_skipped == 3 and report.n_examples == 2
    assert "3 bad records skipped" in report.format()
    (note,) = [line for line in report.warnings if "skipped" in line]
    for named in ("line 2 (id 'q2')", "'Bo'", "'q1' appears twice"):
        assert named in note


def test_skipping_bad_records_runs_through_the_official_layout_and_names_a_layout_of_nothing_good(tmp_path):
    raw = {
        "version": "1.1",
        "data": [
            {
                "title": "T",
                "paragraphs": [
                    {"context": "Ann Lee wrote it.", "qas": [{"id": "a", "question": "Who?", "answers": []}]},
                    {"qas": [{"id": "c"}, {"id": "d"}]},  # no context: its two questions go with it
                    {
                        "context": "Bo did.",
                        "qas": [{"id": "b", "question": "Who?", "answers": [{"text": "Bo", "answer_start": 0}]}],
                    },
                ],
            }
        ],
    }
    path = tmp_path / "squad.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(SquadFormatError, match=r"paragraphs\[0\]\.qas\[0\] \(id 'a'\): question 'a' has no answers"):
        load_squad(path)
    examples, report = load_squad(path, skip_bad_records=True)
    assert [ex.id for ex in examples] == ["b"] and report.n_skipped == 3
    assert "paragraphs[1]: missing key 'context'" in report.warnings[-1]
    bad = _jsonl(tmp_path / "bad.jsonl", [{**GOOD, "context": ""}])
    with pytest.raises(SquadFormatError, match=r"holds no questions \(1 bad record skipped: .*line 1"):
        load_squad(bad, skip_bad_records=True)


def test_a_column_layout_that_is_wrong_is_not_a_bad_record_to_skip(tmp_path):
    path = _jsonl(tmp_path / "mine.jsonl", [{"passage": "x", "query": "y", "gold": "x"}])
    with pytest.raises(SquadFormatError, match="missing column"):
        load_squad(path, skip_bad_records=True)


def test_answers_located_by_a_text_that_occurs_twice_are_counted_and_named(tmp_path):
    path = _jsonl(
        tmp_path / "mine.jsonl",
        [
            {"id": "a", "context": "Ann met Bo, and Ann left.", "question": "Who left?", "answer_text": "Ann"},
            {"id": "b", "context": "Ann met Bo.", "question": "Who came?", "answer_text": "Bo"},
            {"id": "c", "context": "Ann met Bo.", "question": "Who?", "answer_text": "Ann", "answer_start": 0},
        ],
    )
    examples, report = load_squad(path)
    assert examples[0].answer_starts == (0,)  # the first occurrence: what the note warns of
    assert report.n_located == 2 and report.ambiguous_ids == ("a",)
    assert "1 of them by a text that occurs more than once" in report.format()
    assert any("question 'a': 'Ann' occurs 2 times" in line for line in report.warnings)
    assert sources.load_examples(f"{path}[:1]")[1].ambiguous_ids == ("a",)  # kept with its part of the file


def test_evaluation_data_has_its_own_column_map(tmp_path):
    train = tmp_path / "train.csv"
    train.write_text(
        "qid,passage,query,gold,title\n"
        + "".join(f"t{i},Ann Lee wrote book {i}.,Who wrote book {i}?,Ann Lee,A{i}\n" for i in range(12))
    )
    evaluation = _jsonl(tmp_path / "dev.jsonl", [{"id": f"e{i}", **GOOD} for i in range(3)])
    mapped = "id=qid,context=passage,question=query,answer_text=gold"
    with pytest.raises(SquadFormatError, match=r"read with the training data's column map.*--eval-column-map"):
        sources.run_examples(str(train), eval_data=str(evaluation), column_map=mapped)
    run = sources.run_examples(str(train), eval_data=str(evaluation), column_map=mapped, eval_column_map="standard")
    assert len(run.train) == 12 and [ex.id for ex in run.eval] == ["e0", "e1", "e2"]
    renamed = _jsonl(tmp_path / "dev2.jsonl", [{"qid": "x", "passage": GOOD["context"], "q": "Who?", "a": "Ann Lee"}])
    run = sources.run_examples(
        str(train),
        eval_data=str(renamed),
        column_map=mapped,
        eval_column_map="id=qid,context=passage,question=q,answer_text=a",
    )
    assert [ex.id for ex in run.eval] == ["x"]


def test_skip_bad_records_reaches_every_side_of_a_run(tmp_path):
    train = _jsonl(
        tmp_path / "train.jsonl",
        [{"id": f"t{i}", "title": f"A{i}", **GOOD} for i in range(12)] + [{**GOOD, "context": ""}],
    )
    evaluation = _jsonl(tmp_path / "dev.jsonl", [{"id": "e0", **GOOD}, {"id": "e1", **GOOD, "answer_text": "Zed"}])
    with pytest.raises(SquadFormatError, match=r"train\.jsonl: line 13"):
        sources.run_examples(str(train), eval_data=str(evaluation))
    run = sources.run_examples(str(train), eval_data=str(evaluation), skip_bad_records=True)
    assert len(run.train) == 12 and [ex.id for ex in run.eval] == ["e0"]
    assert [r.n_skipped for r in run.reports] == [1, 1]


def test_the_bad_records_named_are_the_first_in_the_file_whatever_their_problem(tmp_path):
    path = _jsonl(
        tmp_path / "mine.jsonl",
        [
            {"id": "q1", **GOOD},
            {"id": "q2", **GOOD, "answer_text": "Zed"},  # line 2: found only when answers are checked
            {"id": "q1", **GOOD},  # line 3: an id given twice, found then too
            *({"id": f"e{i}", **GOOD, "context": ""} for i in range(3)),  # lines 4-6: found as each is read
        ],
    )
    _, report = load_squad(path, skip_bad_records=True)
    (note,) = [line for line in report.warnings if "skipped" in line]
    assert report.n_skipped == 5 and "5 bad records skipped" in note
    named = re.findall(r"line (\d+)", note)
    assert named == ["2", "3", "1", "4"]  # the repeated id names where it was first seen too ("first at line 1")


def test_a_csv_with_blank_lines_names_the_right_line(tmp_path):
    path = tmp_path / "mine.csv"
    path.write_text("id,context,question,answer_text\na,Ann wrote it.,Who?,Ann\n\n\nb,Bo read it.,Who?,Zed\n")
    with pytest.raises(SquadFormatError, match=r"mine\.csv: line 5 \(id 'b'\)"):
        load_squad(path)


def test_column_map_settings_are_named_and_an_evaluation_map_without_evaluation_data_is_said_to_do_nothing():
    from bertqa.config import TrainConfig

    with pytest.raises(ValueError, match=r"eval_column_map: column map names unknown columns \['foo'\]"):
        TrainConfig(eval_column_map="foo=bar")
    assert ("eval_column_map", "eval_data") in TrainConfig(eval_column_map="standard").unused_settings()


def test_evaluation_data_that_does_not_fit_its_own_map_names_that_map(tmp_path):
    train = _jsonl(tmp_path / "train.jsonl", [{"id": f"t{i}", "title": f"A{i}", **GOOD} for i in range(4)])
    evaluation = _jsonl(tmp_path / "dev.jsonl", [{"id": "e0", **GOOD}])
    with pytest.raises(SquadFormatError, match=r"read with its own column map, eval_column_map \(--eval-column-map\)"):
        sources.run_examples(str(train), eval_data=str(evaluation), eval_column_map="context=passage")
