"""No silent failures: what would corrupt a run is refused, problems are found early and named, nothing is lost.

Each test here is one class of failure a user met: a model folder without a tokenizer, a resume with changed
settings, damaged checkpoints, a finished run about to be overwritten, outputs that cannot be written, values the
model cannot run, infinities in JSON, messages that do not say where, and a finished run resumed again.
"""

from __future__ import annotations

import json
import math
import re

import pytest

from bertqa import engine
from bertqa.config import TrainConfig, load_config
from bertqa.model import ModelNotFoundError, build_tokenizer
from bertqa.training import checkpoint
from bertqa.training.reporting import dumps
from tests.conftest import tiny_config

RUN = dict(batch_size=8, save_every_steps=2, keep_checkpoints=3)


def finished_run(tmp_path, tiny, **changes):
    config = tiny_config(tmp_path, **{**RUN, **changes})
    engine.fit(config, model=tiny())
    return config


# ------------------------------------------------------------------------------------------------ model folders


def test_a_model_folder_without_tokenizer_files_is_refused_by_name(tmp_path, tiny):
    tiny().save_pretrained(tmp_path)
    with pytest.raises(ModelNotFoundError, match=r"holds no tokenizer: none of tokenizer\.json, vocab\.txt"):
        build_tokenizer(tmp_path)


def test_windows_longer_than_the_model_can_read_are_refused_before_work(tmp_path, tiny):
    with pytest.raises(ValueError, match=r"max_seq_length=600 is longer than .* 512 entries"):
        engine.fit(tiny_config(tmp_path, max_seq_length=600), model=tiny())
    assert not (tmp_path / "run" / "config.json").exists()


def test_config_values_are_checked_and_named():
    for changes, message in [
        ({"max_answer_length": 0}, "max_answer_length must be positive"),
        ({"max_query_length": 0}, "max_query_length must be positive"),
        ({"keep_checkpoints": 0}, "keep_checkpoints must be positive"),
        ({"lr": "1e-4"}, "key 'lr': expected float, got str"),
        ({"max_steps": 0}, "max_steps must be positive when set"),
        ({"lr": float("nan")}, "lr must be positive and finite, got nan"),
        ({"lr": float("inf")}, "lr must be positive and finite, got inf"),
        ({"seed": -1}, r"seed must be a whole number from 0 to 2\*\*32 - 1, got -1"),
        ({"output_dir": ""}, "output_dir must name a folder"),
        ({"eval_split": 0.0}, "eval_split must be above 0 and below 1, got 0.0"),
        ({"calibration_split": 1.0}, r"calibration_split must be 0 \(no calibration\) or between 0 and 1"),
        ({"max_seq_length": 128}, r"a quarter of the room is usual: doc_stride=15"),
    ]:
        with pytest.raises(ValueError, match=message):
            TrainConfig(**changes)


def test_a_tracker_that_is_not_installed_is_an_error_not_a_warning(tmp_path, tiny):
    with pytest.raises(ValueError, match="trackers that are not installed: tensorboard"):
        engine.fit(tiny_config(tmp_path, report_to=("tensorboard",)), model=tiny())


def test_a_broken_config_file_names_the_file_and_the_key(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text('{"lr": 1e-4,')
    with pytest.raises(ValueError, match=r"broken\.json: not valid JSON at line 1"):
        load_config(broken)
    typed = tmp_path / "typed.json"
    typed.write_text('{"batch_size": "32"}')
    with pytest.raises(ValueError, match=r"typed\.json: .*key 'batch_size': expected int, got str"):
        load_config(typed)


# ------------------------------------------------------------------------------------------------------ resuming


def test_resume_with_changed_settings_is_refused_then_accepted_and_recorded(tmp_path, tiny):
    finished = finished_run(tmp_path, tiny)
    with pytest.raises(ValueError, match=r"lr: 0\.001 -> 0\.002.*--accept-changes"):
        engine.fit(finished.replace(resume="latest", lr=2e-3), model=tiny())
    engine.fit(finished.replace(resume="latest", log_every=3), model=tiny())  # bookkeeping may change
    engine.fit(finished.replace(resume="latest", lr=2e-3, accept_changes=True), model=tiny())
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["lr"] == 2e-3 and saved["_changes"][0]["changes"] == {"lr": [1e-3, 2e-3]}
    assert load_config(tmp_path / "run" / "config.json").lr == 2e-3  # the record does not stop it being read


def test_resuming_a_finished_run_adds_no_duplicate_evaluation(tmp_path, tiny, caplog):
    finished = finished_run(tmp_path, tiny)
    before = (tmp_path / "run" / "metrics.jsonl").read_text()
    with caplog.at_level("INFO", logger="bertqa"):
        summary = engine.fit(finished.replace(resume="latest"), model=tiny())
    assert re.search(r"this run had done all its \d+ updates: nothing is left to train", caplog.text)
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == before
    assert summary["final"]["f1"] == json.loads(before.splitlines()[-1])["f1"]


@pytest.mark.parametrize("damage", ["truncate weights", "truncate optimizer", "truncate rng", "flip a byte"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_newest_intact_one(tmp_path, tiny, caplog, damage):
    finished_run(tmp_path, tiny)
    newest, older = checkpoint.list_checkpoints(tmp_path / "run")[::-1][:2]
    target = {
        "truncate weights": "model.safetensors",
        "truncate optimizer": "optimizer.bin",
        "truncate rng": "random_states_0.pkl",
        "flip a byte": "model.safetensors",
    }[damage]
    path = newest / target
    raw = bytearray(path.read_bytes())
    if damage == "flip a byte":
        raw[len(raw) // 2] ^= 1
    else:
        raw = raw[: len(raw) // 2]
    path.write_bytes(bytes(raw))
    assert checkpoint.verify(newest) is not None
    with caplog.at_level("WARNING", logger="bertqa"):
        assert checkpoint.resolve_resume("latest", tmp_path / "run") == older
    assert "damaged" in caplog.text and target in caplog.text
    with pytest.raises(ValueError, match="is damaged"):
        checkpoint.resolve_resume(str(newest), tmp_path / "run")


def test_pruning_removes_damaged_checkpoints_and_keeps_the_good_ones(tmp_path, tiny):
    config = finished_run(tmp_path, tiny, keep_checkpoints=2)
    good, newest = checkpoint.list_checkpoints(tmp_path / "run")
    (newest / "optimizer.bin").write_bytes(b"cut")
    engine.fit(config.replace(resume=str(good), epochs=2.0, accept_changes=True), model=tiny())
    kept = checkpoint.list_checkpoints(tmp_path / "run")
    assert newest not in kept or checkpoint.verify(newest) is None  # rewritten intact, or removed
    assert all(checkpoint.verify(folder) is None for folder in kept) and len(kept) == 2


def test_a_finished_run_is_not_overwritten_without_being_asked(tmp_path, tiny):
    finished = finished_run(tmp_path, tiny, save_model=True)
    import shutil

    shutil.rmtree(tmp_path / "run" / "checkpoints")
    for resume in (None, "latest"):
        with pytest.raises(
            ValueError, match=r"holds an earlier run \(final_model, best_model, metrics.jsonl.*--overwrite"
        ):
            engine.fit(finished.replace(resume=resume), model=tiny())
    assert (tmp_path / "run" / "final_model").is_dir()
    engine.fit(finished.replace(overwrite=True), model=tiny())
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 1


def test_a_checkpoint_that_runs_out_of_space_leaves_the_one_before_it_latest(tmp_path, tiny, monkeypatch):
    from accelerate import Accelerator

    save_state, calls = Accelerator.save_state, []

    def full_disk_the_second_time(self, folder, *args, **kwargs):
        calls.append(folder)
        save_state(self, folder, *args, **kwargs)  # a partial folder, as a real full disk leaves
        if len(calls) == 2:
            raise OSError(28, "No space left on device", f"{folder}/optimizer.bin")

    monkeypatch.setattr(Accelerator, "save_state", full_disk_the_second_time)
    with pytest.raises(OSError) as caught:
        engine.fit(tiny_config(tmp_path, **RUN), model=tiny())
    out, message = tmp_path / "run", str(caught.value)
    before = checkpoint.checkpoint_dir(out, 2)
    assert message.startswith(f"could not write checkpoint {checkpoint.checkpoint_dir(out, 4)}: [Errno 28] No space")
    assert f"{before} is intact and stays the latest" in message and "partial folder was removed" in message
    size = sum(p.stat().st_size for p in before.rglob("*") if p.is_file())
    assert f"needs about {size / 2**20:,.1f} MiB" in message and "\n" not in message
    assert checkpoint.list_checkpoints(out) == [before] and checkpoint.verify(before) is None
    assert not list((out / "checkpoints").glob("*.tmp"))


def test_an_output_dir_that_is_a_file_is_refused_before_work(tmp_path, tiny):
    (tmp_path / "run").write_text("not a folder")
    with pytest.raises(NotADirectoryError, match="is a file, not a folder"):
        engine.fit(tiny_config(tmp_path), model=tiny())


# ------------------------------------------------------------------------------------------------------- outputs


def test_outputs_are_strict_json():
    text = dumps({"score": -math.inf, "odds": [math.nan, 1.5], "ok": "x"})
    assert json.loads(text) == {"score": None, "odds": [None, 1.5], "ok": "x"}
    assert "Infinity" not in text and "NaN" not in text


def test_an_accepted_learning_rate_change_is_the_one_used_after_resuming(tmp_path, tiny):
    config = tiny_config(tmp_path, batch_size=4, save_every_steps=2, schedule="constant", warmup_ratio=0.0)
    engine.fit(config.replace(max_steps=4), model=tiny())
    lrs = []
    engine.fit(
        config.replace(max_steps=6, lr=5e-3, resume="latest", accept_changes=True),
        model=tiny(),
        callbacks=[lambda u: lrs.append(u.lr)],
    )
    assert lrs == [pytest.approx(5e-3)] * 2  # not the checkpoint's 1e-3


def test_a_model_trained_on_v2_data_stays_v2_whatever_its_evaluation_share_holds(tmp_path):
    from bertqa.data import Example, Window
    from bertqa.sources import RunExamples

    answered = Example("a", "T", "a b", "q", ("a",), (0,))
    unanswerable = Example("b", "T", "a b", "q", (), (), True)
    examples = RunExamples(
        train=[answered, unanswerable],
        eval=[answered],
        calibration=[unanswerable],
        calibration_split=0.05,
        reports=(),
        eval_described="held out",
        eval_data=None,
    )
    meta = checkpoint.model_meta(examples, window=Window(), max_answer_length=30, column_map=None)
    assert meta["v2"] is True and meta["threshold_calibrated_on"]["questions"] == 1 and meta["eval_data"] is None


def test_the_answerer_names_bad_questions(tiny_dir):
    from bertqa.deploy.serving import Answerer

    answerer = Answerer(tiny_dir, precision="no")
    assert answerer([]) == []
    with pytest.raises(TypeError, match="pass a list"):
        answerer({"question": "Who?", "context": "Ann."})
    with pytest.raises(ValueError, match=r"question 1 \(id 'x'\): 'context' is missing"):
        answerer([{"question": "Who?", "context": "Ann."}, {"id": "x", "question": "Who?"}])
    with pytest.raises(ValueError, match="'question' must be non-empty text"):
        answerer([{"question": " ", "context": "Ann."}])
    (answer,) = answerer([{"id": 7, "question": "Who wrote it?", "context": "Ann Lee wrote it."}], top_k=2)
    assert answer.id == 7 and "Ann Lee wrote it."[answer.start : answer.end] == answer.answer


def test_a_folder_without_checkpoints_is_not_offered_for_resuming(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="holds an earlier run") as err:
        checkpoint.resolve_resume(None, tmp_path)
    assert "--resume latest" not in str(err.value) and "--overwrite true" in str(err.value)


# -------------------------------------------------------------------------------------------- the hub, offline


@pytest.mark.parametrize(
    ("env", "reason"),
    [
        ({"HF_HUB_OFFLINE": "1"}, "HF_HUB_OFFLINE=1 is set"),
        ({"HF_ENDPOINT": "http://127.0.0.1:9"}, "http://127.0.0.1:9 cannot be reached"),  # nothing listens there
    ],
)
@pytest.mark.parametrize("flag", ["--model", "--train-data"])
def test_a_hub_id_without_the_hub_fails_in_seconds_naming_it_and_the_ways_forward(tmp_path, env, reason, flag):
    import os
    import subprocess
    import sys
    import time

    from tests.test_scripts import ENV, ROOT, SMALL

    environ = {k: v for k, v in ENV.items() if not k.endswith("_OFFLINE")} | env
    hub_id = {"--model": "bert-base-uncased", "--train-data": "someone/squad-like"}[flag]
    t0 = time.perf_counter()
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "train.py"),
            *SMALL,
            flag,
            hub_id,
            "--output-dir",
            str(tmp_path / "run"),
        ],
        cwd=ROOT,
        env=environ,
        capture_output=True,
        text=True,
        timeout=300,
    )
    seconds = time.perf_counter() - t0
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert repr(hub_id) in last and reason in last and "local" in last and "where the hub can be reached" in last
    assert seconds < 45, f"{seconds:.0f} s to fail"  # start-up included; retrying the hub took a minute
    assert os.environ.get("HF_HUB_OFFLINE") == "1"  # the suite itself stays offline


def test_the_answerer_gives_probabilities_with_the_calibration_saved_with_the_model(tiny_dir, tmp_path):
    import shutil

    from bertqa.deploy.serving import Answerer

    question = [{"question": "Who wrote it?", "context": "Ann Lee wrote it in 1990, and Bo read it."}]
    warm = tmp_path / "warm"
    shutil.copytree(tiny_dir, warm)
    (warm / "bertqa.json").write_text(json.dumps({"temperature": 4.0}))
    plain, hot = Answerer(tiny_dir, precision="no"), Answerer(warm, precision="no")
    assert (plain.calibration.temperature, hot.calibration.temperature) == (1.0, 4.0)
    (a,), (b,) = plain(question, top_k=3), hot(question, top_k=3)
    assert (a.answer, a.start, [c["answer"] for c in a.top_k]) == (b.answer, b.start, [c["answer"] for c in b.top_k])
    spread = lambda answer: answer.top_k[0]["probability"] - answer.top_k[-1]["probability"]  # noqa: E731
    assert spread(b) < spread(a)  # less sure at a higher temperature, in the same order
