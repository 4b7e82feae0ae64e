"""The recipes in recipes/ run as written and do what they say: a loop of one's own gets fit's loss curve (and its
schedule in two processes), and a loss of one's own reuses bertqa's span loss."""

from __future__ import annotations

import importlib.util
import json
import time

import pytest
import torch

from bertqa import engine
from bertqa.training import optim
from tests.test_scripts import ROOT, script, two_processes

# End to end: scripts, processes and whole runs (seconds each); `make test-fast` leaves them out.
pytestmark = pytest.mark.e2e

SETTINGS = [
    "--train-data",
    "dev-v1.1",
    "--eval-data",
    "dev-v1.1",
    "--max-train-examples",
    "40",
    "--max-eval-examples",
    "12",
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
    "--epochs",
    "2",
    "--log-every",
    "1",
    "--cache-dir",
    "none",
]


def recipe(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "recipes" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def small_batch(tokenizer):
    """Six real questions' windows in one batch, padded to the longest."""
    from bertqa import batching, data, sources

    examples, _ = sources.load_examples("dev-v1.1", max_examples=6, seed=3)
    features = data.label_features(data.tokenize_examples(examples, tokenizer, data.Window(96, 32, 32)), examples)
    batch = batching.Collator(tokenizer.pad_token_id)(
        [batching.FeatureDataset(features)[i] for i in range(len(features))]
    )
    assert not batch["attention_mask"].all()  # some windows are padded
    return batch


def own_loop(tmp_path, tiny_dir, *extra, launch=None):
    log = tmp_path / "own.json"
    args = ["--model", tiny_dir, *SETTINGS, "--precision", "no", "--log-json", log, "--output-dir", tmp_path / "own"]
    result = script("recipes/own_loop.py", *args, *extra, launch=launch)
    return json.loads(log.read_text()), result


def test_a_loop_of_ones_own_gets_the_same_loss_curve_as_fit(tmp_path, tiny_dir):
    script("train.py", "--model", tiny_dir, *SETTINGS, "--mixed-precision", "no", "--output-dir", tmp_path / "fit")
    fit_log = [json.loads(line) for line in (tmp_path / "fit" / "train_log.jsonl").read_text().splitlines()]
    fit_log = [r for r in fit_log if "loss" in r]  # the step-0 record holds the starting LR only
    own, result = own_loop(tmp_path, tiny_dir)
    assert [r["step"] for r in own] == [r["step"] for r in fit_log] and len(own) > 10
    assert [r["lr"] for r in own] == pytest.approx([r["lr"] for r in fit_log], rel=1e-9)
    assert [r["loss"] for r in own] == pytest.approx([r["loss"] for r in fit_log], rel=1e-5)
    fit_evals = [json.loads(line) for line in (tmp_path / "fit" / "metrics.jsonl").read_text().splitlines()]
    own_evals = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["f1"] for r in own_evals] == pytest.approx([r["f1"] for r in fit_evals])
    assert (tmp_path / "own" / "checkpoints").is_dir()


def test_a_loop_of_ones_own_in_two_processes_steps_its_prepared_schedule_once_per_update(tmp_path, tiny_dir):
    own, result = own_loop(tmp_path, tiny_dir, launch=two_processes())
    total = own[-1]["step"]
    # 2 processes of batch 4 share each epoch's batches: half the updates of one process, once per update each.
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    schedule = optim.build_scheduler(opt, total_steps=total, warmup_steps=round(0.1 * total))
    expected = []
    for _ in range(total):
        opt.step()
        schedule.step()
        expected.append(schedule.get_last_lr()[0])
    assert [r["step"] for r in own] == list(range(1, total + 1))
    assert [r["lr"] for r in own] == pytest.approx(expected, abs=1e-12)  # ends at 0 exactly at the last update
    assert len(result.stdout.splitlines()) == 2  # one evaluation line per epoch, from the main process only


def test_label_smoothing_reuses_the_span_loss(small_batch, tiny):
    smoothed_loss = recipe("label_smoothing").smoothed_loss
    model = tiny()
    assert torch.equal(smoothed_loss(model, small_batch, smoothing=0.0), engine.default_loss(model, small_batch))
    out = model(**engine.model_inputs(small_batch))
    real = small_batch["attention_mask"].bool()
    uniform = []  # cross-entropy against a uniform target over each window's real tokens, by hand
    for logits in (out.start_logits, out.end_logits):
        for row, mask in zip(logits, real):
            uniform.append(-torch.log_softmax(row[mask], -1).mean())
    by_hand = 0.7 * engine.default_loss(model, small_batch) + 0.3 * torch.stack(uniform).mean()
    assert torch.allclose(smoothed_loss(model, small_batch, smoothing=0.3), by_hand, rtol=1e-5)


def test_the_label_smoothing_recipe_trains_through_fit(tmp_path, tiny_dir):
    args = ["--model", tiny_dir, *SETTINGS, "--epochs", "1", "--smoothing", "0.2", "--output-dir", tmp_path / "run"]
    result = script("recipes/label_smoothing.py", *args)
    line = json.loads(result.stdout.strip().splitlines()[-1])
    assert line["smoothing"] == 0.2 and line["steps"] > 0 and 0 <= line["f1"] <= 100
    assert (tmp_path / "run" / "final_model" / "model.safetensors").exists()


def test_an_optimizer_of_ones_own_gives_the_head_its_own_lr(tmp_path, tiny_dir, tiny):
    head_lr = recipe("head_lr")
    model = tiny()
    opt = head_lr.head_boosted_adamw(model, lr=1e-4, weight_decay=0.01, multiplier=10)
    lrs = {(g["name"], g["weight_decay"]): g["lr"] for g in opt.param_groups}
    assert lrs == pytest.approx(
        {("encoder", 0.01): 1e-4, ("encoder", 0.0): 1e-4, ("head", 0.01): 1e-3, ("head", 0.0): 1e-3}
    )
    heads = {id(p) for g in opt.param_groups if g["name"] == "head" for p in g["params"]}
    assert heads == {id(p) for n, p in model.named_parameters() if n.startswith("qa_outputs")}
    args = ["--model", tiny_dir, *SETTINGS, "--max-steps", "4", "--head-lr-multiplier", "5", "--output-dir", tmp_path]
    out = json.loads(script("recipes/head_lr.py", *args).stdout.splitlines()[-1])
    assert out["steps"] == 4 and out["head_lr"] == pytest.approx(5e-3)
    assert "head: peak lr 0.005" in script("recipes/head_lr.py", *args, "--overwrite", "true").stderr


def test_a_fixed_length_run_stops_at_its_deadline(tmp_path, tiny_dir):
    stop = recipe("stop_at_deadline").StopAfter(0.2)
    stop.on_update(None, engine.Update(step=1, epoch=0, lr=1e-3, loss=torch.zeros(())))  # the clock starts here
    time.sleep(0.15)
    stop.on_update(None, engine.Update(step=2, epoch=0, lr=1e-3, loss=torch.zeros(())))
    resumed = recipe("stop_at_deadline").StopAfter(0.2)  # what a resumed run's hook is given back
    resumed.load_state_dict(stop.state_dict())
    resumed.on_update(None, engine.Update(step=3, epoch=0, lr=1e-3, loss=torch.zeros(())))  # its clock starts again
    time.sleep(0.1)
    with pytest.raises(engine.StopTraining, match=r"deadline: 0.2 s of training passed at update 4"):
        resumed.on_update(None, engine.Update(step=4, epoch=0, lr=1e-3, loss=torch.zeros(())))
    args = ["--model", tiny_dir, *SETTINGS, "--epochs", "50", "--train-seconds", "1.5", "--output-dir", tmp_path]
    out = json.loads(script("recipes/stop_at_deadline.py", *args).stdout.splitlines()[-1])
    assert out["stopped_early"].startswith("deadline: 1.5 s") and out["steps"] > 0


def test_a_loop_of_ones_own_saves_and_stops_at_sigterm_and_resumes(tmp_path, tiny_dir):
    import signal
    import subprocess
    import sys

    from bertqa.training import checkpoint
    from tests.test_scripts import ENV

    long = [a if a != "2" else "40" for a in SETTINGS]  # 40 epochs: far longer than the signal takes
    cmd = [
        sys.executable,
        str(ROOT / "recipes" / "own_loop.py"),
        "--model",
        str(tiny_dir),
        *long,
        "--precision",
        "no",
        "--output-dir",
        str(tmp_path / "own"),
    ]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first_epoch = json.loads(proc.stdout.readline())  # printed after the first epoch's checkpoint
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    saved = checkpoint.latest_checkpoint(tmp_path / "own")
    assert proc.returncode == 143 and "Traceback" not in err, err[-3000:]
    assert f"saved {saved}; run the same command with --resume to continue" in err
    assert saved is not None and int(saved.name.split("_")[1]) > first_epoch["step"]  # mid-epoch, not the epoch end
    # Resumed with 2 epochs, which it has passed already: only where it starts is checked here.
    resumed = subprocess.run(
        [*cmd, "--resume", "--epochs", "2"], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300
    )
    assert f"resumed from {saved}" in resumed.stdout
