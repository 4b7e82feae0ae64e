"""The scripts end to end (tiny model): train, evaluate, predict, two processes, a SIGKILL and resume, bad input."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import as_records

# End to end: scripts, processes and whole runs (seconds each); `make test-fast` leaves them out.
pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
SMALL = [
    "--train-data",
    "dev-v1.1",
    "--eval-data",
    "dev-v2.0",
    "--max-train-examples",
    "48",
    "--max-eval-examples",
    "24",
    "--max-seq-length",
    "128",
    "--doc-stride",
    "32",
    "--max-query-length",
    "32",
    "--batch-size",
    "4",
    "--lr",
    "1e-3",
    "--cache-dir",
    "none",
]


def script(name: str, *args: str, launch: list[str] | None = None, check: bool = True, **kw):
    """Run a script of scripts/ by its name, or any other file by its path from the repository root."""
    path = ROOT / name if "/" in name else ROOT / "scripts" / name
    cmd = [*(launch or [sys.executable]), str(path), *map(str, args)]
    kw.setdefault("cwd", ROOT)  # evaluate.py writes to eval/ in its working folder unless --out says
    result = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600, **kw)
    if check and result.returncode != 0:
        raise AssertionError(f"{name} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def two_processes() -> list[str]:
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or "accelerate"
    return [
        accelerate,
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        "29517",
    ]


def test_help_explains_every_setting():
    import dataclasses

    from bertqa.config import PRESETS, TrainConfig

    out = script("train.py", "--help").stdout
    for field in dataclasses.fields(TrainConfig):  # every setting has a flag, with its own help text
        assert "--" + field.name.replace("_", "-") in out, field.name
        assert field.metadata["help"].split()[0] in out, field.name
    assert all(name in out for name in PRESETS) and "flags given on the command line override both" in out
    resolved = json.loads(script("train.py", "--preset", "quick", "--lr", "2e-4", "--print-config").stdout)
    assert resolved["lr"] == 2e-4 and resolved["max_train_examples"] == PRESETS["quick"]["max_train_examples"]
    # "none" clears a preset's value; a flag not given leaves it
    assert PRESETS["recipe"]["eval_every_steps"] is not None
    recipe = ["train.py", "--preset", "recipe", "--print-config"]
    cleared = json.loads(script(*recipe, "--eval-every-steps", "none").stdout)
    kept = json.loads(script(*recipe).stdout)
    assert cleared["eval_every_steps"] is None and kept["eval_every_steps"] == PRESETS["recipe"]["eval_every_steps"]
    for name in ("evaluate.py", "predict.py"):
        assert "usage:" in script(name, "--help").stdout


def test_train_evaluate_predict(tmp_path, tiny_dir):
    run = tmp_path / "run"
    result = script("train.py", "--model", tiny_dir, *SMALL, "--epochs", "1", "--output-dir", run)
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert {"exact", "f1", "HasAns_f1", "NoAns_f1", "best_f1"} <= set(summary)
    assert "in-window labels that decode to the gold answer" in result.stderr
    meta = json.loads((run / "final_model" / "bertqa.json").read_text())
    assert meta["v2"] is True and isinstance(meta["no_answer_threshold"], float)

    out = tmp_path / "eval"
    script("evaluate.py", run / "final_model", "--data", "dev-v2.0", "--max-examples", "24", "--out", out)
    scores = json.loads((out / "scores.json").read_text())
    assert scores["no_answer_threshold"] == meta["no_answer_threshold"]
    preds = json.loads((out / "predictions.json").read_text())
    assert len(preds) == 24 and len(json.loads((out / "null_odds.json").read_text())) == 24
    # Without --data: the evaluation data recorded with the model; the wrong SQuAD version is scored, loudly.
    recorded = script("evaluate.py", run / "final_model", "--max-examples", "8", cwd=tmp_path).stderr
    assert "evaluating on dev-v2.0, the evaluation data recorded with the model" in recorded
    # Trained without unanswerable questions, its threshold was chosen on that same evaluation data: said so.
    assert meta["threshold_calibrated_on"]["source"].startswith("the evaluation data")
    assert "was chosen on its evaluation data dev-v2.0" in recorded and "optimistic" in recorded
    mismatch = script("evaluate.py", run / "final_model", "--data", "dev-v1.1", "--max-examples", "8", cwd=tmp_path)
    mismatch = mismatch.stderr
    assert "VERSION MISMATCH" in mismatch and "scored as v2.0 with the model's no-answer threshold" in mismatch

    questions = tmp_path / "q.jsonl"
    questions.write_text(
        json.dumps({"id": "a", "question": "Who?", "context": "Ann wrote it."})
        + "\n"
        + json.dumps({"question": "When?", "context": "It was 1990."})
        + "\n"
    )
    lines = script("predict.py", run / "final_model", "--file", questions, "--top-k", "3").stdout.strip().splitlines()
    answers = [json.loads(line) for line in lines]
    assert [a["id"] for a in answers] == ["a", 1]  # kept as given, else the position
    contexts = ["Ann wrote it.", "It was 1990."]
    for answer, context in zip(answers, contexts):
        assert {"answer", "start", "end", "score", "probability", "no_answer_probability", "top_k"} <= set(answer)
        assert 0 <= answer["no_answer_probability"] <= 1 and len(answer["top_k"]) <= 3
        for cand in answer["top_k"]:
            assert context[cand["start"] : cand["end"]] == cand["answer"] and 0 <= cand["probability"] <= 1
        if answer["answer"]:
            assert context[answer["start"] : answer["end"]] == answer["answer"]


def test_negatives_turn_answerable_only_data_without_titles_into_a_calibrated_v2_run(tmp_path, tiny_dir):
    from bertqa.sources import load_examples

    # A user's own answerable-only records: no titles, no ids, one question per passage.
    records = tmp_path / "mine.jsonl"
    lines = [
        json.dumps({"context": ex.context, "question": ex.question, "answer_text": ex.answer_texts[0]})
        for ex in load_examples("dev-v1.1", max_examples=160, seed=5)[0]
    ]
    records.write_text("\n".join(lines) + "\n")
    run = tmp_path / "run"
    args = [*SMALL[4:], "--model", tiny_dir, "--train-data", records, "--negatives", "1", "--output-dir", run]
    result = script("train.py", *args, "--max-steps", "3", "--label-check-min", "0.9")
    assert "negatives for training:" in result.stderr and "lexically closest" in result.stderr
    assert "negatives for the held-out evaluation share:" in result.stderr
    assert "scored as v2.0" not in result.stderr  # the held-out share has negatives: v2 data, nothing to explain
    assert re.search(r"threshold is chosen at each evaluation on [\d,]+ held-out training questions", result.stderr)
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["NoAns_f1"] is not None and summary["HasAns_f1"] is not None
    meta = json.loads((run / "final_model" / "bertqa.json").read_text())
    assert meta["v2"] is True and meta["threshold_calibrated_on"]["source"].startswith("5% of the training data")


def test_two_processes_give_the_same_predictions_as_one(tmp_path, tiny_dir):
    # fp32: bf16 results depend slightly on how windows are batched, and the processes batch them differently.
    args = [tiny_dir, "--data", "dev-v2.0", "--max-examples", "50", "--batch-size", "7", "--precision", "no"]
    script("evaluate.py", *args, "--out", tmp_path / "one")
    result = script("evaluate.py", *args, "--out", tmp_path / "two", launch=two_processes())
    assert "on 2 processes" in result.stderr
    one = json.loads((tmp_path / "one" / "predictions.json").read_text())
    two = json.loads((tmp_path / "two" / "predictions.json").read_text())
    assert one == two and len(one) == 50
    s1 = json.loads((tmp_path / "one" / "scores.json").read_text())
    s2 = json.loads((tmp_path / "two" / "scores.json").read_text())
    for key in ("exact", "f1", "HasAns_f1", "NoAns_f1", "best_f1"):
        assert s1[key] == pytest.approx(s2[key])


def test_two_process_training_runs(tmp_path, tiny_dir):
    result = script(
        "train.py",
        "--model",
        tiny_dir,
        *SMALL,
        "--epochs",
        "1",
        "--output-dir",
        tmp_path / "ddp",
        launch=two_processes(),
    )
    assert "2 processes" in result.stderr and "effective batch 8 windows" in result.stderr
    assert (tmp_path / "ddp" / "final_model" / "model.safetensors").exists()
    for line in ("effective batch 8 windows", "label self-check", "eval at step"):  # the main process's word only
        assert result.stderr.count(line) == 1, line


def final_record(run: Path) -> dict:
    return json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])


def test_sigkill_mid_run_then_resume_matches_uninterrupted(tmp_path, tiny_dir):
    args = ["--model", tiny_dir, *SMALL, "--batch-size", "2", "--epochs", "3", "--save-every-steps", "10"]
    script("train.py", *args, "--output-dir", tmp_path / "straight")

    killed = tmp_path / "killed"
    cmd = [sys.executable, str(ROOT / "scripts" / "train.py"), *map(str, args), "--output-dir", str(killed)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (killed / "checkpoints" / "step_00000020").exists() and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert not (killed / "final_model").exists(), "the run finished before it could be killed"

    result = script("train.py", *args, "--output-dir", killed, "--resume", "latest")
    assert re.search(r"resumed from .*step_000000[2-9]0", result.stderr)
    a, b = final_record(tmp_path / "straight"), final_record(killed)
    assert (a["step"], a["exact"], a["f1"]) == (b["step"], b["exact"], b["f1"])
    from safetensors.torch import load_file

    wa = load_file(tmp_path / "straight" / "final_model" / "model.safetensors")
    wb = load_file(killed / "final_model" / "model.safetensors")
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "/no/such/model"], "model folder '/no/such/model' does not exist"),
        (["--doc-stride", "400"], "doc_stride=400 must be >= 0 and smaller"),
        (["--train-data", "/no/such.json"], "data file not found: /no/such.json"),
        (["--lr", "-1"], "lr must be positive"),
        (["--negatives", "-1"], "negatives must be a whole number >= 0, got -1"),
        (["--negatives", "1.5"], "argument --negatives: invalid int value: '1.5'"),
    ],
)
def test_bad_input_gives_a_clear_error(tmp_path, args, message):
    result = script("train.py", *SMALL, "--output-dir", tmp_path / "r", *args, check=False)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr


def test_fresh_run_refuses_to_mix_with_old_checkpoints(tmp_path, tiny_dir):
    (tmp_path / "r" / "checkpoints" / "step_00000005").mkdir(parents=True)
    result = script("train.py", "--model", tiny_dir, *SMALL, "--output-dir", tmp_path / "r", check=False)
    assert result.returncode == 2 and "--resume latest" in result.stderr


def test_outputs_that_cannot_be_written_are_refused_before_any_work(tmp_path, tiny_dir):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    result = script("evaluate.py", tiny_dir, "--max-examples", "4", "--out", blocker / "eval", check=False)
    assert result.returncode == 2 and "a-file" in result.stderr and "Traceback" not in result.stderr
    assert "evaluating" not in result.stderr  # refused before the model ran
    result = script("predict.py", tiny_dir, "-q", "Who?", "-c", "Ann.", "--out", blocker / "x.jsonl", check=False)
    assert result.returncode == 2 and "a-file" in result.stderr
    taken = tmp_path / "answers.jsonl"
    taken.write_text("keep me")
    result = script("predict.py", tiny_dir, "-q", "Who?", "-c", "Ann.", "--out", taken, check=False)
    assert result.returncode == 2 and "--overwrite" in result.stderr and taken.read_text() == "keep me"


def test_evaluations_never_overwrite_each_other(tmp_path, tiny_dir):
    model = tmp_path / "model"
    shutil.copytree(tiny_dir, model)
    for _ in range(2):
        said = script("evaluate.py", model, "--max-examples", "4", cwd=tmp_path).stderr
    out = tmp_path / "eval" / f"{tmp_path.name}-model"  # by the model folder's name and its parent's
    assert (out / "dev-v1.1" / "scores.json").is_file() and (out / "dev-v1.1-2" / "scores.json").is_file()
    assert f"results go to {Path('eval') / out.name / 'dev-v1.1-2'}" in said
    assert not (model / "eval").exists()  # nothing written into the model folder, which travels with the model
    result = script("evaluate.py", model, "--max-examples", "4", "--out", out / "dev-v1.1", check=False)
    assert result.returncode == 2 and "--overwrite" in result.stderr


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"question": "Who?", "context": "Ann."}\n{"question": "Who?"\n', r"q\.jsonl: line 2 is not valid JSON"),
        ("", r"q\.jsonl: the file is empty"),
        ('{"question": "", "context": "Ann."}\n', r"q\.jsonl: line 1: 'question' must be non-empty text"),
        ('{"context": "Ann."}\n', r"q\.jsonl: line 1: 'question' is missing"),
    ],
)
def test_predict_names_the_bad_line(tmp_path, tiny_dir, content, message):
    questions = tmp_path / "q.jsonl"
    questions.write_text(content)
    result = script("predict.py", tiny_dir, "--file", questions, check=False)
    assert result.returncode == 2 and re.search(message, result.stderr), result.stderr
    assert "Traceback" not in result.stderr


def test_predict_rejects_a_zero_batch_size_and_writes_strict_json(tmp_path, tiny_dir):
    result = script("predict.py", tiny_dir, "-q", "Who?", "-c", "Ann.", "--batch-size", "0", check=False)
    assert result.returncode == 2 and "must be at least 1" in result.stderr
    out = script("predict.py", tiny_dir, "-q", "Who?", "-c", "Ann wrote it.").stdout
    json.loads(out, parse_constant=lambda name: pytest.fail(f"not strict JSON: {name}"))
    # A context the tokenizer turns into no tokens at all (a zero-width space) is refused, named by its place.
    result = script("predict.py", tiny_dir, "-q", "Who?", "-c", "\u200b", check=False)
    assert result.returncode == 2 and "--question/--context: 'context' yields no tokens" in result.stderr
    questions = tmp_path / "q.jsonl"
    questions.write_text('{"question": "Who?", "context": "Ann."}\n{"question": "\\u0001", "context": "Ann."}\n')
    result = script("predict.py", tiny_dir, "--file", questions, check=False)
    assert result.returncode == 2 and "q.jsonl: line 2: 'question' yields no tokens" in result.stderr


def test_a_config_file_that_is_broken_is_named(tmp_path):
    broken = tmp_path / "config.json"
    broken.write_text('{"lr": 0.1,,}')
    result = script("train.py", "--config", broken, check=False)
    assert result.returncode == 2 and f"{broken}: not valid JSON at line 1" in result.stderr


def test_a_stalled_process_stops_its_peer_with_a_message(tmp_path, tiny_dir):
    args = [
        "--model",
        tiny_dir,
        *SMALL,
        "--batch-size",
        "2",
        "--epochs",
        "5",
        "--save-every-steps",
        "2",
        "--collective-timeout-s",
        "8",
        "--output-dir",
        tmp_path / "r",
    ]
    cmd = [*two_processes(), str(ROOT / "scripts" / "train.py"), *map(str, args)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    ranks: list[int] = []
    try:
        deadline = time.time() + 240
        while not (tmp_path / "r" / "checkpoints" / "step_00000002").exists() and time.time() < deadline:
            time.sleep(0.1)
        ranks = [
            int(p)
            for p in subprocess.run(
                ["pgrep", "-f", "-P", str(proc.pid), "train.py"], capture_output=True, text=True
            ).stdout.split()
        ]
        assert len(ranks) == 2, ranks
        os.kill(max(ranks), signal.SIGSTOP)  # one rank stalls; the other must not wait for ever
        _, err = proc.communicate(timeout=120)
    finally:
        for pid in ranks:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.kill()
    assert proc.returncode != 0
    assert re.search(r"error: process \d of 2 gave up waiting for the others", err), err[-3000:]


def test_the_installed_package_is_imported_from_the_folder_above_the_checkout(tmp_path):
    # A checkout named bertqa, Python started in the folder above it: that folder must not pass for the package.
    (tmp_path / "bertqa").symlink_to(ROOT, target_is_directory=True)
    code = "import bertqa.engine, bertqa.data; print(bertqa.__file__); print(bertqa.data.Window.__name__)"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == [str(ROOT / "bertqa" / "__init__.py"), "Window"]


def test_pack_model_does_not_replace_a_folder_without_being_asked(tmp_path):
    model = tmp_path / "final_model"
    model.mkdir()
    (model / "model.safetensors").write_text("a trained model")
    result = script("pack_model.py", "--out", model, check=False)
    assert result.returncode == 2 and "exists and is not empty; pass --overwrite" in result.stderr
    assert (model / "model.safetensors").read_text() == "a trained model"


def test_a_training_log_written_to_a_file_reads_as_plain_lines(tmp_path, tiny_dir):
    """`train.py ... 2> log`: no progress bar's carriage returns or escape codes, each line its own, the eval line
    once per evaluation, and a plain line saying where training stands."""
    v2 = ["--train-data", "dev-v2.0[:1]", "--eval-data", "dev-v2.0[1:2]", "--max-train-examples", "60"]
    args = ["--model", tiny_dir, *SMALL, *v2, "--eval-every-steps", "4", "--output-dir", tmp_path / "run"]
    cmd = [sys.executable, str(ROOT / "scripts" / "train.py"), *map(str, args)]
    with open(tmp_path / "log", "w") as log:
        subprocess.run(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=log, timeout=600, check=True)
    text = (tmp_path / "log").read_text()
    assert "\r" not in text and "\x1b" not in text
    evals = [line for line in text.splitlines() if " eval at step " in line]
    steps = [line.split(" eval at step ")[1].split(":")[0] for line in evals]
    assert len(steps) >= 2 and len(steps) == len(set(steps))  # each evaluation said once
    assert re.search(r"INFO update \d+ of \d+ \(\d+%\): loss ", text)
    assert re.search(r"no-answer threshold .*, chosen on \d+ held-out questions: there it answers \d+ of", text)


def test_a_share_held_out_of_a_file_named_relative_to_one_folder_is_drawn_again_from_another(tmp_path, tiny_dir):
    from bertqa.sources import load_examples

    examples, _ = load_examples("dev-v1.1[:3]")
    work, other = tmp_path / "work", tmp_path / "other"
    work.mkdir(), other.mkdir()
    rows = as_records(examples[:60], ids=True)
    (work / "mine.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    run = tmp_path / "run"
    settings = [
        "--model",
        tiny_dir,
        *SMALL[8:],
        "--train-data",
        "mine.jsonl",
        "--max-steps",
        "2",
        "--label-check-min",
        "0.8",
    ]
    script("train.py", *settings, "--output-dir", run, cwd=work)
    last = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]
    said = script("evaluate.py", run / "final_model", cwd=other).stderr
    assert f"held out of {work / 'mine.jsonl'}" in said
    scores = json.loads((other / "eval" / "run-final_model" / "held-out" / "scores.json").read_text())
    assert (scores["f1"], scores["total"]) == (last["f1"], last["total"])
    card = (run / "final_model" / "README.md").read_text()
    assert f"- Data: {work / 'mine.jsonl'} (" in card and "the training data's licence is not recorded" in card


def test_evaluate_without_data_scores_the_share_the_run_held_out_to_the_digit(tmp_path, tiny_dir):
    run = tmp_path / "run"
    held_out = ["--train-data", "dev-v1.1", "--eval-split", "0.2", "--max-train-examples", "60"]
    settings = SMALL[4:]  # all but the evaluation data, which is held out here
    script("train.py", "--model", tiny_dir, *settings, *held_out, "--max-steps", "4", "--output-dir", run)
    last = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]
    result = script("evaluate.py", run / "final_model", "--out", tmp_path / "eval")
    assert "questions the run held out of dev-v1.1 (20%, seed 42), drawn again" in result.stderr
    meta = json.loads((run / "final_model" / "bertqa.json").read_text())  # the held-out share said in words
    said = r"dev-v1\.1: [\d,]+ of the training questions held out \(2\d%; 20% asked\), seed 42; (\d+) of them scored"
    assert int(re.fullmatch(said, meta["eval_data"])[1]) == last["total"], meta["eval_data"]
    assert meta["trained"]["eval_split"] in meta["eval_data"] and meta["trained"]["eval_data"] == "dev-v1.1"
    scores = json.loads((tmp_path / "eval" / "scores.json").read_text())
    assert (scores["exact"], scores["f1"], scores["total"]) == (last["exact"], last["f1"], last["total"])
    rows = [json.loads(line) for line in (tmp_path / "eval" / "questions.jsonl").read_text().splitlines()]
    assert len(rows) == last["total"] and [r["f1"] for r in rows] == sorted(r["f1"] for r in rows)  # worst first
    assert sum(scores["errors"].values()) == len(rows) and "what the answers were" in result.stderr
    assert {"id", "question", "gold", "prediction", "probability", "exact", "f1", "kind"} <= set(rows[0])
    ece = scores["confidence"]["probability"]["ece"]
    assert 0 <= ece <= 1 and (tmp_path / "eval" / "reliability.png").stat().st_size > 1000
    assert f"expected calibration error {ece:.3f} over {len(rows)} questions" in result.stderr


def test_own_data_with_its_own_columns_and_bad_records_trains_and_is_evaluated_again(tmp_path, tiny_dir):
    """A CSV training file in one's own columns and a JSONL evaluation file in the standard ones, each with a bad
    record: train.py skips and names them, evaluate.py on the model reads the same data the same way, and
    check_labels.py takes the same flags."""
    import csv

    from bertqa.sources import load_examples

    examples, _ = load_examples("dev-v1.1", max_examples=40, seed=0)
    train_csv = tmp_path / "train.csv"
    with open(train_csv, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["qid", "passage", "query", "gold", "where", "topic"])
        for ex in examples[:30]:
            writer.writerow([ex.id, ex.context, ex.question, ex.answer_texts[0], ex.answer_starts[0], ex.title])
        writer.writerow(["bad", "", "Who?", "x", "", "t"])  # an empty context
    dev = tmp_path / "dev.jsonl"
    lines = [
        {"id": ex.id, "context": ex.context, "question": ex.question, "answer_text": ex.answer_texts[0]}
        for ex in examples[30:]
    ]
    lines.append({"id": "bad", "context": "Ann.", "question": "Who?", "answer_text": "Zed"})
    dev.write_text("".join(json.dumps(line) + "\n" for line in lines))
    columns = "id=qid,context=passage,question=query,answer_text=gold,answer_start=where,title=topic"
    settings = SMALL[8:]  # the window and batch settings
    data = ["--train-data", train_csv, "--eval-data", dev, "--column-map", columns, "--max-steps", "2"]
    refused = script("train.py", "--model", tiny_dir, *settings, *data, "--output-dir", tmp_path / "x", check=False)
    assert refused.returncode != 0 and re.search(
        r"train\.csv: line \d+ \(id 'bad'\).*--skip-bad-records", refused.stderr
    )
    run = tmp_path / "run"
    own = ["--eval-column-map", "standard", "--skip-bad-records"]
    trained = script("train.py", "--model", tiny_dir, *settings, *data, *own, "--output-dir", run)
    assert "train.csv: 1 bad record skipped" in trained.stderr and "dev.jsonl: 1 bad record skipped" in trained.stderr
    meta = json.loads((run / "final_model" / "bertqa.json").read_text())
    assert (meta["column_map"], meta["eval_column_map"], meta["skip_bad_records"]) == (columns, "standard", True)
    last = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]
    script("evaluate.py", run / "final_model", "--out", tmp_path / "eval")
    scores = json.loads((tmp_path / "eval" / "scores.json").read_text())
    assert (scores["f1"], scores["total"]) == (last["f1"], last["total"]) and last["total"] == 10
    # The same file however its path is spelled is read as recorded; a setting given wins over the recorded one.
    relative = os.path.relpath(dev, ROOT)
    script("evaluate.py", run / "final_model", "--data", relative, "--out", tmp_path / "eval-2")
    strict = ["--skip-bad-records", "false", "--out", tmp_path / "eval-3"]
    refused = script("evaluate.py", run / "final_model", *strict, check=False)
    assert refused.returncode != 0 and "dev.jsonl: line 11 (id 'bad')" in refused.stderr
    checked = script(
        "check_labels.py", "--data", train_csv, "--column-map", columns, "--skip-bad-records", "--model", tiny_dir
    )
    assert "30 questions" in checked.stdout and "1 bad record skipped" in checked.stdout


def test_the_fsdp_configuration_on_cpu_processes_is_refused_by_name(tmp_path, tiny_dir):
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or "accelerate"
    config = ROOT / "docs" / "accelerate" / "fsdp.yaml"
    launch = [accelerate, "launch", "--config_file", config, "--num_processes", "2", "--mixed_precision", "no"]
    args = ["--model", tiny_dir, *SMALL, "--max-steps", "1", "--output-dir", tmp_path / "run"]
    result = script("train.py", *args, launch=[*map(str, launch), "--main_process_port", "29523"], check=False)
    assert result.returncode != 0
    assert "configured for FSDP, but Accelerate set up" in result.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()
