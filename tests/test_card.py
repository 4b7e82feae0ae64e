"""Model cards and what a model folder records (`bertqa.card`), and pushing a model to the Hub
(`bertqa.deploy.share`, `scripts/push.py`) up to the network's edge."""

from __future__ import annotations

import contextlib
import http.server
import io
import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from bertqa import card, engine
from bertqa.deploy import share
from bertqa.deploy.backends import DEFAULT_SETTINGS
from tests.conftest import tiny_config
from tests.test_scripts import ENV, ROOT, script

SQUAD = "SQuAD (Rajpurkar et al.), CC BY-SA 4.0"


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_dir):
    """A short run of the tiny model that saves its best and final models (evaluations at updates 2 and 4)."""
    root = tmp_path_factory.mktemp("card")
    config = tiny_config(root, model=str(tiny_dir), save_model=True, max_steps=4, eval_every_steps=2)
    engine.fit(config)
    return root / "run"


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"f1"' in line]


def scores(loaded: ModelCard) -> dict[str, float]:
    return {r.metric_name: r.metric_value for r in loaded.data.eval_results}


def test_the_card_of_a_saved_model_parses_and_its_scores_are_the_records(run, tiny_dir):
    final, best = ModelCard.load(run / "final_model" / "README.md"), ModelCard.load(run / "best_model" / "README.md")
    evals = records(run)
    assert scores(final) == {"EM": evals[-1]["exact"], "F1": evals[-1]["f1"]}  # exactly as metrics.jsonl has them
    top = max((r for r in evals if r["step"] > 0), key=lambda r: r["f1"])
    assert scores(best) == {"EM": top["exact"], "F1": top["f1"]}
    data = final.data
    assert data.pipeline_tag == "question-answering" and data.library_name == "transformers" and "bertqa" in data.tags
    assert data.datasets == ["rajpurkar/squad"] and data.base_model is None  # a local base: not a Hub link
    result = data.eval_results[0]
    assert result.dataset_type == "rajpurkar/squad" and result.dataset_split == "validation"
    assert result.dataset_name == "dev-v1.1 (12 questions)" and result.task_type == "question-answering"


def test_the_card_says_what_made_the_model(run):
    meta = json.loads((run / "final_model" / "bertqa.json").read_text())
    trained, text = meta["trained"], (run / "final_model" / "README.md").read_text()
    assert trained["train_data"] == "dev-v1.1" and trained["train_questions"] == 40 and trained["eval_questions"] == 12
    assert trained["data_licence"] == SQUAD and trained["settings"]["max_steps"] == 4
    assert trained["bertqa_version"] and trained["precision"] in ("bf16", "no") and " on " in trained["hardware"]
    checked = trained["label_check"]
    assert checked["decoded_to_gold"] == checked["labelled"] > 0
    assert meta["eval"]["train_time_s"] > 0 and meta["eval"]["step"] == 4
    for line in (
        "- Data: dev-v1.1 (40 training questions); evaluated on dev-v1.1 (12 questions).",
        f"{checked['decoded_to_gold']} of {checked['labelled']} in-window answer labels decode back",
        f"- Command: `{trained['command']}`",
        f"- Precision {trained['precision'].replace('no', 'fp32')}, on {trained['hardware']}; 4 optimizer updates in ",
        "`max_steps=4`",
        "Scored only on dev-v1.1",
        "it always answers, even when the passage holds none",
        f"the training data: {SQUAD}",
    ):
        assert line in text, line


def test_the_cards_code_runs_as_written(run):
    """Both ways of loading the model that the card shows: bertqa's Answerer, and plain transformers."""
    text = (run / "final_model" / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)
    assert len(blocks) == 2
    for code in blocks:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(code, "card", "exec"), {})
        printed = out.getvalue().strip()
        assert printed, code
    assert printed in "The book was written by Ann Lee in 1990."  # a span of the context (the model is untrained)


def test_a_v2_card_lists_has_and_no_answer_scores_and_its_threshold(tmp_path, tiny_dir):
    config = tiny_config(tmp_path, model=str(tiny_dir), save_model=True, max_steps=2, train_data="dev-v2.0[:20]")
    engine.fit(config.replace(eval_data="dev-v2.0[20:22]", max_train_examples=60))
    folder = tmp_path / "run" / "final_model"
    meta, last = json.loads((folder / "bertqa.json").read_text()), records(tmp_path / "run")[-1]
    loaded = ModelCard.load(folder / "README.md")
    assert scores(loaded) == {
        "EM": last["exact"],
        "F1": last["f1"],
        "HasAns F1": last["HasAns_f1"],
        "NoAns F1": last["NoAns_f1"],
        "no-answer threshold": meta["no_answer_threshold"],
    }
    on = meta["threshold_calibrated_on"]
    assert f"chosen on {on['source']} ({on['questions']:,} questions)" in loaded.text
    assert 'says "no answer"' in loaded.text and loaded.data.datasets == ["rajpurkar/squad_v2"]


def test_data_licences_are_said_only_where_known(tmp_path):
    from bertqa.loading import BUNDLED

    assert card.data_licence("train-v1.1", "dev-v2.0[:25]") == SQUAD
    assert card.data_licence(str(BUNDLED["dev-v1.1"]), "rajpurkar/squad_v2") == SQUAD
    assert card.data_licence("dev-v1.1+squad_v2") == SQUAD
    assert card.data_licence("squad:train", "rajpurkar/squad_v2:validation") == SQUAD  # hub ids with a split
    mine = tmp_path / "mine.jsonl"
    mine.write_text("")
    assert card.data_licence("dev-v1.1", str(mine)) is None  # the user's own data: theirs to state
    assert card.data_licence("dev-v1.1+someone/qa") is None and card.data_licence(None) is None


def test_the_base_models_licence_comes_from_its_own_card(tiny_dir):
    assert card.base_licence("minilm-l6") == "apache-2.0"  # its README.md says so
    assert card.base_licence(str(tiny_dir)) is None  # no card to read
    t0 = time.perf_counter()
    assert card.base_licence("someone/not-cached") is None  # offline: not in the cache, no hub
    assert time.perf_counter() - t0 < 10


def test_a_folder_that_records_nothing_still_gets_a_card_that_parses():
    text = card.card_text(DEFAULT_SETTINGS, ref="some/model")
    loaded = ModelCard(text)
    assert loaded.data.pipeline_tag == "question-answering" and not loaded.data.eval_results
    assert "No evaluation is recorded" in text and "does not record how the model was trained" in text
    assert "Fine-tuned" not in text  # nothing says bertqa trained it


# -- pushing --------------------------------------------------------------------------------------------------------


def test_the_files_a_push_sends_are_the_model_folders_own(run, tmp_path):
    import shutil

    folder = tmp_path / "final_model"
    shutil.copytree(run / "final_model", folder)
    expected = ["README.md", "bertqa.json", "config.json", "model.safetensors", "tokenizer.json"]
    expected.append("tokenizer_config.json")
    (folder / "eval").mkdir()  # an evaluation kept inside by an older bertqa: results, not the model
    (folder / "eval" / "scores.json").write_text("{}")
    (folder / ".cache").mkdir()
    (folder / ".cache" / "x").write_text("")
    (folder / "weights.tmp").write_text("")
    nested = folder / "eval" / "quick-final_model" / "dev-v1.1"  # where evaluate.py run inside the model writes
    nested.mkdir(parents=True)
    (nested / "scores.json").write_text("{}")
    (nested / "predictions.json").write_text("{}")
    secret = tmp_path / "secret.txt"
    secret.write_text("not the model's")
    (folder / "notes.txt").symlink_to(secret)  # a link out of the folder: left out
    assert share.files_to_push(folder) == expected


@pytest.mark.parametrize(
    ("path", "said"),
    [
        ("run", "is a training run's folder, not a model folder; pass the model it saved"),
        ("checkpoints", "holds the checkpoints of the training run"),
        ("final_model/config.json", "is a file; a model is a folder"),
        ("empty", "holds no model (no config.json, nor adapter_config.json)"),
        ("not-there/model", "does not exist"),
    ],
)
def test_a_push_of_what_is_not_a_model_folder_is_refused_by_name(run, path, said, tmp_path):
    (run.parent / "empty").mkdir(exist_ok=True)
    target = run.parent / path if path in ("empty", "not-there/model") else run / path if path != "run" else run
    with pytest.raises((ValueError, FileNotFoundError), match=re.escape(said)):
        share.files_to_push(target)


def test_what_is_pushed_has_the_cards_code_pointed_at_the_repository(run):
    folder = run / "final_model"
    files = share.files_to_push(folder)
    with share._staged(folder, files, "someone/tiny-qa") as stage:
        sent = sorted("/".join(p.relative_to(stage).parts) for p in stage.rglob("*") if p.is_file())
        assert sent == files
        text = (stage / "README.md").read_text()
        assert text.count('MODEL = "someone/tiny-qa"') == 2 and str(folder) not in text
        assert (stage / "model.safetensors").read_bytes() == (folder / "model.safetensors").read_bytes()
    assert f'MODEL = "{folder}"' in (folder / "README.md").read_text()  # the folder itself is as it was


class Refusing(http.server.BaseHTTPRequestHandler):
    """A hub endpoint that answers every request with 401, as the hub does for a token it does not accept."""

    def _refuse(self) -> None:
        body = b'{"error": "Invalid credentials in Authorization header"}'
        self.send_response(401)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_POST = do_HEAD = do_PUT = _refuse

    def log_message(self, *args: object) -> None:
        pass


def push(*args: object, **env: str) -> tuple[subprocess.CompletedProcess, float]:
    base = {k: v for k, v in ENV.items() if not k.endswith("_OFFLINE") and k != "HF_TOKEN"}
    t0 = time.perf_counter()
    cmd = [sys.executable, str(ROOT / "scripts" / "push.py"), *map(str, args)]
    result = subprocess.run(cmd, cwd=ROOT, env={**base, **env}, capture_output=True, text=True, timeout=120)
    return result, time.perf_counter() - t0


@pytest.mark.e2e
def test_push_fails_within_seconds_naming_the_repository_where_it_cannot_push(run, tmp_path):
    model = run / "final_model"
    home = {"HOME": str(tmp_path), "HF_HOME": str(tmp_path / "hf")}  # no token saved by `hf auth login` here
    offline, seconds = push(model, "someone/tiny-qa", HF_HUB_OFFLINE="1", HF_TOKEN="hf_x", **home)
    assert offline.returncode == 2 and seconds < 10
    assert "error: cannot push to someone/tiny-qa: the hub cannot be used here (HF_HUB_OFFLINE=1" in offline.stderr
    no_token, seconds = push(model, "someone/tiny-qa", **home)
    assert no_token.returncode == 2 and seconds < 10
    assert "cannot push to someone/tiny-qa: no Hugging Face token found. Log in with `hf auth login`" in no_token.stderr
    closed, seconds = push(model, "someone/tiny-qa", HF_TOKEN="hf_x", HF_ENDPOINT="http://127.0.0.1:9", **home)
    assert closed.returncode == 2 and seconds < 10 and "http://127.0.0.1:9 cannot be reached" in closed.stderr


@pytest.mark.e2e
def test_push_stops_where_the_hub_refuses_and_says_why(run, tmp_path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Refusing)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        env = {"HF_TOKEN": "hf_x", "HF_ENDPOINT": endpoint, "HOME": str(tmp_path), "HF_HOME": str(tmp_path / "hf")}
        refused, seconds = push(run / "final_model", "someone/tiny-qa", "--private", **env)
    finally:
        server.shutdown()
    assert refused.returncode == 2 and seconds < 30, refused.stderr
    assert "error: the hub refused the push to someone/tiny-qa:" in refused.stderr
    assert "the token was not accepted" in refused.stderr


@pytest.mark.parametrize("repo_id", ["a b/c", "x/y/z", "", "me/", "me/" + "n" * 100, "me/--x"])
def test_a_repository_id_the_hub_would_refuse_is_refused_before_anything(repo_id):
    with pytest.raises(ValueError, match=re.escape(f"{repo_id!r} is not a Hub repository id")):
        share.check_repo_id(repo_id)


@pytest.mark.e2e
def test_push_dry_run_lists_the_files(run):
    result = script("push.py", run / "final_model", "someone/tiny-qa", "--dry-run")
    listed = [line.strip() for line in result.stdout.splitlines()[1:]]
    assert result.stdout.startswith(f"would push 6 files of {run / 'final_model'} to someone/tiny-qa:")
    assert listed == share.files_to_push(run / "final_model")
