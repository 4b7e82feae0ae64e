"""Any transformers question-answering model through `Answerer`, the scripts, the service and an export: tiny BERTs
saved by plain transformers (no bertqa.json) answer with windows that fit them, stated in the log; --v2 and
--threshold make "no answer" possible and are never ignored; a QA head that was never trained is said loudly."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForQuestionAnswering, BertConfig, RobertaConfig

from bertqa.data import Window
from bertqa.deploy.backends import untrained_head
from bertqa.deploy.serving import Answerer
from bertqa.deploy.settings import answer_version, default_window, readable_length
from bertqa.model import ModelNotFoundError, resolve_model
from tests.conftest import TINY, make_tiny, tiny_config

QUESTION = {"id": "q", "question": "Who wrote the book?", "context": "The book was written by Ann Lee in 1990."}
DEFAULTS = "max_seq_length 384, doc_stride 128, max_query_length 64, max_answer_length 30"
NEVER, ALWAYS = 1e6, -1e6  # thresholds that no no-answer score passes, and that every one does


@pytest.fixture(scope="module")
def plain(tmp_path_factory, tokenizer) -> dict[str, Path]:
    """Tiny BERTs saved as plain transformers saves them (`save_pretrained`, no bertqa.json): "trained" (its head's
    bias moved off zero, as training moves it), "fresh" (its head as transformers initialises it) and "encoder" (a
    base encoder, no QA head at all)."""
    config = AutoConfig.from_pretrained(resolve_model("minilm-l6"), **TINY)
    root = tmp_path_factory.mktemp("plain")
    torch.manual_seed(0)
    trained = AutoModelForQuestionAnswering.from_config(config)
    with torch.no_grad():
        trained.qa_outputs.bias.copy_(torch.tensor([0.25, -0.5]))
    models = {
        "trained": trained,
        "fresh": AutoModelForQuestionAnswering.from_config(config),
        "encoder": AutoModel.from_config(config, add_pooling_layer=False),
    }
    for name, model in models.items():
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    return {name: root / name for name in models}


# ------------------------------------------------------------------------------------------- windows and versions


def fake_tokenizer(model_max_length: int, special: int = 3) -> SimpleNamespace:
    return SimpleNamespace(model_max_length=model_max_length, num_special_tokens_to_add=lambda pair: special)


def test_a_model_without_settings_gets_windows_it_can_read():
    bert = BertConfig(max_position_embeddings=512)
    assert default_window(fake_tokenizer(512), bert) == Window()  # reads 512: bertqa's defaults
    # RoBERTa numbers positions after its padding index: 130 entries read 128 tokens; no stated tokenizer limit
    roberta = RobertaConfig(max_position_embeddings=130, pad_token_id=1)
    assert readable_length(fake_tokenizer(int(1e30), 4), roberta) == 128
    assert default_window(fake_tokenizer(int(1e30), 4), roberta) == Window(128, 42, 21)  # 384:128:64 kept
    assert readable_length(fake_tokenizer(256), RobertaConfig(max_position_embeddings=514)) == 256
    assert default_window(fake_tokenizer(int(1e30)), SimpleNamespace()) == Window()  # nothing says: the defaults
    with pytest.raises(ValueError, match="reads at most 6 tokens, too few"):
        default_window(fake_tokenizer(6), bert)


@pytest.mark.parametrize(
    ("saved", "asked", "answers"),
    [
        ((False, None), (None, None), (False, None)),  # a SQuAD 1.1 model, or one bertqa did not train
        ((False, None), (True, None), (True, 0.0)),  # --v2: the default threshold
        ((False, None), (None, -2.0), (True, -2.0)),  # --threshold implies --v2
        ((True, 1.5), (None, None), (True, 1.5)),  # a v2 model: its saved threshold
        ((True, 1.5), (True, None), (True, 1.5)),
        ((True, 1.5), (None, -2.0), (True, -2.0)),  # a threshold given overrides it
        ((True, 1.5), (False, None), (False, None)),  # --v2 false: always a span
    ],
)
def test_the_version_and_threshold_asked_for(saved, asked, answers):
    settings = {"v2": saved[0], "no_answer_threshold": saved[1]}
    got, said = answer_version(settings, v2=asked[0], threshold=asked[1])
    assert (got["v2"], got["no_answer_threshold"]) == answers
    assert said.startswith(f"as a SQuAD {'2.0' if answers[0] else '1.1'} model")


def test_a_threshold_with_v2_off_is_refused():
    with pytest.raises(ValueError, match=r"v2=False .* rules out"):
        answer_version({"v2": True, "no_answer_threshold": 1.0}, v2=False, threshold=0.5)


# ------------------------------------------------------------------------------------------------------ Answerer


def test_a_plain_folder_answers_as_squad_1_with_its_defaults_said(plain, caplog):
    caplog.set_level("INFO", logger="bertqa")
    answerer = Answerer(plain["trained"], precision="no")
    said = [r.getMessage() for r in caplog.records if "has no bertqa.json" in r.getMessage()]
    assert len(said) == 1 and DEFAULTS in said[0] and "as a SQuAD 1.1 model" in said[0], caplog.text
    assert (answerer.v2, answerer.threshold, answerer.untrained_head) == (False, None, None)
    assert answerer.settings_from.startswith("defaults")
    answer = answerer([QUESTION])[0]
    assert answer.answer and QUESTION["context"][answer.start : answer.end] == answer.answer
    assert answer.no_answer_probability is None and "UNTRAINED" not in caplog.text


def test_a_plain_folder_that_reads_fewer_tokens_gets_shorter_windows(tmp_path, tokenizer, caplog):
    config = AutoConfig.from_pretrained(resolve_model("minilm-l6"), **TINY, max_position_embeddings=128)
    AutoModelForQuestionAnswering.from_config(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)  # its model_max_length is 512: the position table is the limit
    caplog.set_level("INFO", logger="bertqa")
    answerer = Answerer(tmp_path, precision="no")
    assert Window.from_dict(answerer.settings) == Window(128, 42, 21)
    assert "max_seq_length 128 (the most the model reads), doc_stride 42, max_query_length 21" in caplog.text
    long = {**QUESTION, "context": " ".join([QUESTION["context"]] * 40)}  # many windows, none past 128 tokens
    answer = answerer([long])[0]
    assert long["context"][answer.start : answer.end] == answer.answer


def test_v2_and_a_threshold_make_no_answer_possible_for_a_plain_folder(plain, caplog):
    caplog.set_level("INFO", logger="bertqa")
    v2 = Answerer(plain["trained"], precision="no", v2=True)
    assert (v2.v2, v2.threshold) == (True, 0.0) and "as a SQuAD 2.0 model as asked" in caplog.text
    assert v2([QUESTION])[0].no_answer_probability is not None
    none = Answerer(plain["trained"], precision="no", threshold=ALWAYS)([QUESTION])[0]  # --threshold implies --v2
    assert (none.answer, none.start, none.end) == ("", None, None) and none.probability == none.no_answer_probability
    some = Answerer(plain["trained"], precision="no", threshold=NEVER)([QUESTION])[0]
    assert some.answer and some.no_answer_probability is not None
    with pytest.raises(ValueError, match="rules out"):
        Answerer(plain["trained"], v2=False, threshold=0.0)


def with_settings(source: Path, folder: Path, **settings) -> Path:
    """A copy of `source` with a bertqa.json of `settings`, as a bertqa run saves one."""
    shutil.copytree(source, folder)
    (folder / "bertqa.json").write_text(json.dumps({**Window(128, 32, 32).to_dict(), **settings}))
    return folder


def test_a_threshold_for_a_model_trained_on_squad_1_is_applied_and_said(plain, tmp_path, caplog):
    caplog.set_level("INFO", logger="bertqa")
    v1 = with_settings(plain["trained"], tmp_path / "v1", v2=False, eval={"step": 5})
    answerer = Answerer(v1, precision="no", threshold=ALWAYS)
    warned = [r for r in caplog.records if r.levelname == "WARNING" and "trained on SQuAD 1.1" in r.getMessage()]
    assert warned and "has no bertqa.json" not in caplog.text and answerer.settings_from == "bertqa.json"
    assert answerer.settings["max_seq_length"] == 128 and answerer([QUESTION])[0].answer == ""
    v2 = with_settings(plain["trained"], tmp_path / "v2", v2=True, no_answer_threshold=NEVER, eval={"step": 5})
    assert Answerer(v2, precision="no").threshold == NEVER  # its own threshold
    assert Answerer(v2, precision="no", threshold=ALWAYS)([QUESTION])[0].answer == ""  # overridden, as asked


# --------------------------------------------------------------------------------------------- untrained QA heads


def test_a_head_that_was_never_trained_is_said_loudly(plain, caplog, capfd):
    caplog.set_level("INFO", logger="bertqa")
    fresh = Answerer(plain["fresh"], precision="no")
    assert "as transformers initialises it" in fresh.untrained_head
    encoder = Answerer(plain["encoder"], precision="no")
    assert "qa_outputs.bias, qa_outputs.weight are not in its checkpoint" in encoder.untrained_head
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert [w.startswith("UNTRAINED QA HEAD") for w in warnings] == [True, True], warnings
    assert "LOAD REPORT" not in capfd.readouterr().err  # transformers' own report of the missing head is left out
    assert encoder([QUESTION])[0].answer  # it still answers, as asked, having said what the answers are worth


def test_a_model_bertqa_trained_for_one_update_is_not_flagged(tmp_path, caplog):
    from bertqa.engine import fit

    config = tiny_config(tmp_path, max_steps=1, save_model=True, max_train_examples=16, max_eval_examples=4)
    fit(config, model=make_tiny())
    model = tmp_path / "run" / "final_model"
    assert json.loads((model / "bertqa.json").read_text())["eval"]["step"] == 1
    caplog.set_level("WARNING", logger="bertqa")
    assert Answerer(model, precision="no").untrained_head is None and "UNTRAINED" not in caplog.text
    # One update may leave a bias at exactly zero (the loss barely depends on it): the recorded updates are believed.
    head = make_tiny()
    assert untrained_head(head, set(), trained_steps=0) is not None
    assert untrained_head(head, set(), trained_steps=1) is None


# ------------------------------------------------------------------------------------------------------ the service


def test_the_service_says_how_a_plain_model_answers_and_that_its_head_is_untrained(plain):
    from fastapi.testclient import TestClient

    from bertqa.deploy.service import create_app

    with TestClient(create_app(Answerer(plain["fresh"], precision="no", threshold=ALWAYS))) as client:
        health = client.get("/health").json()
        assert (health["v2"], health["no_answer_threshold"]) == (True, ALWAYS)
        assert health["settings"].startswith("defaults") and "initialises" in health["untrained_head"]
        reply = client.post("/answer", json=QUESTION).json()
        assert reply["answer"] == "" and reply["start"] is None and "no_answer_probability" in reply
    with TestClient(create_app(Answerer(plain["trained"], precision="no"))) as client:
        health = client.get("/health").json()
        assert (health["v2"], health["no_answer_threshold"], health["untrained_head"]) == (False, None, None)


def test_a_hub_id_offline_fails_within_seconds_naming_it(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))  # nothing cached, wherever this runs
    t0 = time.monotonic()
    with pytest.raises(ModelNotFoundError, match="'deepset/roberta-base-squad2' is not a local folder nor in"):
        Answerer("deepset/roberta-base-squad2", v2=True)
    assert time.monotonic() - t0 < 10


# ------------------------------------------------------------------------------------------------------ the scripts


def script(name: str, *args, **kw) -> subprocess.CompletedProcess:
    from tests.test_scripts import script as run_script

    return run_script(name, *args, **kw)


@pytest.mark.e2e
def test_predict_takes_a_plain_folder_and_v2_and_threshold(plain):
    ask = ["-q", QUESTION["question"], "-c", QUESTION["context"], "--precision", "no"]
    result = script("predict.py", plain["trained"], *ask)
    answer = json.loads(result.stdout)
    assert answer["answer"] and "no_answer_probability" not in answer
    assert "has no bertqa.json" in result.stderr and DEFAULTS in result.stderr and "UNTRAINED" not in result.stderr
    assert "no_answer_probability" in json.loads(script("predict.py", plain["trained"], *ask, "--v2").stdout)
    none = json.loads(script("predict.py", plain["trained"], *ask, "--threshold", str(ALWAYS)).stdout)
    assert none["answer"] == "" and none["start"] is None
    fresh = script("predict.py", plain["fresh"], *ask)
    assert "WARNING UNTRAINED QA HEAD" in fresh.stderr and json.loads(fresh.stdout)["answer"]


@pytest.mark.e2e
def test_a_hub_id_offline_fails_in_predict_naming_it(tmp_path):
    from tests.test_scripts import ENV

    cmd = [sys.executable, "scripts/predict.py", "deepset/roberta-base-squad2", "--v2", "-q", "Who?", "-c", "Ann."]
    root = Path(__file__).resolve().parent.parent
    env = {**ENV, "HF_HUB_CACHE": str(tmp_path)}  # nothing cached, wherever this runs
    t0 = time.monotonic()
    result = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "'deepset/roberta-base-squad2' is not a local folder" in result.stderr
    assert "HF_HUB_OFFLINE=1 is set" in result.stderr and "Traceback" not in result.stderr
    assert time.monotonic() - t0 < 60  # the interpreter and torch start, then the refusal: no minute of retries


SQUAD_V1 = {
    "version": "1.1",
    "data": [
        {
            "title": "Books",
            "paragraphs": [
                {
                    "context": QUESTION["context"],
                    "qas": [
                        {
                            "id": "who",
                            "question": "Who wrote the book?",
                            "answers": [{"text": "Ann Lee", "answer_start": 24}],
                        },
                        {
                            "id": "when",
                            "question": "When was it written?",
                            "answers": [{"text": "1990", "answer_start": 35}],
                        },
                    ],
                }
            ],
        }
    ],
}


@pytest.mark.e2e
def test_evaluate_takes_a_plain_folder_and_honours_a_threshold(plain, tmp_path):
    data = tmp_path / "books.json"
    data.write_text(json.dumps(SQUAD_V1))
    common = ["--data", data, "--precision", "no"]
    as_v1 = script("evaluate.py", plain["trained"], *common, "--out", tmp_path / "v1")
    assert "has no bertqa.json" in as_v1.stderr and "as a SQuAD 1.1 model" in as_v1.stderr
    scores = json.loads((tmp_path / "v1" / "scores.json").read_text())
    assert scores["no_answer_threshold"] is None and scores["total"] == 2
    assert all(json.loads((tmp_path / "v1" / "predictions.json").read_text()).values())  # always a span
    script("evaluate.py", plain["trained"], *common, "--threshold", ALWAYS, "--out", tmp_path / "t")
    assert json.loads((tmp_path / "t" / "scores.json").read_text())["no_answer_threshold"] == ALWAYS
    assert set(json.loads((tmp_path / "t" / "predictions.json").read_text()).values()) == {""}  # "no answer"
    # Without --data, the dev set of the version it answers as, in eval/MODEL/DATA of the working folder
    as_v2 = script("evaluate.py", plain["trained"], "--v2", "--max-examples", "4", "--precision", "no", cwd=tmp_path)
    assert "has no bertqa.json: evaluating on dev-v2.0" in as_v2.stderr
    out = tmp_path / "eval" / f"{Path(plain['trained']).parent.name}-{Path(plain['trained']).name}" / "dev-v2.0"
    assert json.loads((out / "scores.json").read_text())["total"] == 4


@pytest.mark.e2e
def test_an_export_records_v2_and_threshold_and_its_untrained_head(plain, tmp_path, caplog):
    out = tmp_path / "onnx"
    result = script("export.py", plain["fresh"], out, "--threshold", ALWAYS, "--check-questions", "4")
    assert "the export matches" in result.stdout and "WARNING UNTRAINED QA HEAD" in result.stderr
    meta = json.loads((out / "bertqa.json").read_text())
    assert (meta["v2"], meta["no_answer_threshold"], meta["max_seq_length"]) == (True, ALWAYS, 384)
    assert "initialises" in meta["export"]["untrained_head"]
    card = (out / "README.md").read_text()  # its card says so too, and that nothing scored it
    assert f"**Its QA head looks never trained**: it {meta['export']['untrained_head']}" in card
    assert "No evaluation is recorded with it" in card and "Fine-tuned" not in card
    caplog.set_level("INFO", logger="bertqa")
    answerer = Answerer(out)  # answers as it was exported, without being told again
    assert (answerer.v2, answerer.threshold, answerer.settings_from) == (True, ALWAYS, "bertqa.json")
    assert answerer.untrained_head and "UNTRAINED QA HEAD" in caplog.text and "has no bertqa.json" not in caplog.text
    assert answerer([QUESTION])[0].answer == ""


def wait_for_health(url: str, proc: subprocess.Popen) -> dict:
    """/health of a server that said where it serves, once it listens (it says so just before)."""
    deadline = time.monotonic() + 60
    while True:
        try:
            return json.loads(urllib.request.urlopen(url + "health", timeout=10).read())
        except OSError:
            assert proc.poll() is None and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.2)


@pytest.mark.e2e
def test_serve_says_an_untrained_head_before_serving_and_in_health(plain):
    from tests.test_scripts import ENV

    root = Path(__file__).resolve().parent.parent
    cmd = [sys.executable, "scripts/serve.py", str(plain["fresh"]), "--v2", "--port", "0", "--precision", "no"]
    proc = subprocess.Popen(cmd, cwd=root, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    try:
        while not (lines and "serving" in lines[-1]):
            line = proc.stdout.readline()
            assert line, f"serve.py ended: {''.join(lines)}"
            lines.append(line)
        said = "".join(lines)
        assert "UNTRAINED QA HEAD" in said and "UNTRAINED QA HEAD: its answers are noise" in lines[-1], said
        url = re.search(r"http://[\d.]+:\d+/", lines[-1])[0]
        health = wait_for_health(url, proc)
        assert health["v2"] is True and health["no_answer_threshold"] == 0.0 and health["untrained_head"]
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=30)
