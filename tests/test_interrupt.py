"""Ctrl-C and SIGTERM: a real signal to a real run saves the update it came in, and the run resumes exactly.

In-process tests send the signal to themselves from an update callback, so it lands at a known update; the script
tests send it from outside, to one process and to one of two, as a terminal or a cluster would.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from bertqa import engine
from bertqa.training import checkpoint, evaluation, interrupt
from bertqa.training.interrupt import Interrupted
from tests.conftest import tiny_config
from tests.test_scripts import ENV, ROOT, SMALL, two_processes


def sends(signum: int, *, at: int, times: int = 1):
    """An update callback that sends `signum` to this process `times` times after update `at`."""

    def callback(update: engine.Update) -> None:
        if update.step == at:
            for _ in range(times):
                os.kill(os.getpid(), signum)

    return callback


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "final_model" / "model.safetensors")


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_saves_the_update_it_came_in_and_the_resumed_run_is_exact(tmp_path, tiny, signum):
    config = tiny_config(tmp_path, epochs=2.0, save_model=True, save_every_steps=4)
    straight_dir = tmp_path / "straight"
    straight = engine.fit(config.replace(output_dir=str(straight_dir)), model=tiny())
    out = Path(config.output_dir)

    with pytest.raises(Interrupted) as caught:
        engine.fit(config, model=tiny(), callbacks=[sends(signum, at=5)])
    stop = caught.value
    assert (stop.step, stop.exit_code, stop.checkpoint) == (5, 128 + signum, checkpoint.checkpoint_dir(out, 5))
    assert checkpoint.verify(stop.checkpoint) is None and not stop.at_once
    assert f"interrupted by {signal.Signals(signum).name} at update 5 of {straight['steps']}" in str(stop)
    assert "--resume latest" in str(stop)
    assert records(out)[-1] == {"step": 5, "epoch": 0, "interrupted": f"interrupted by {signal.Signals(signum).name}"}
    assert not (out / "final_model").exists()  # nothing a user could take for a result
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handlers are put back

    resumed = engine.fit(config.replace(resume="latest"), model=tiny(seed=1))  # weights come from the checkpoint
    assert resumed["steps"] == straight["steps"] and resumed["final"]["f1"] == straight["final"]["f1"]
    scores = [[(r["step"], r["exact"], r["f1"]) for r in records(run) if "f1" in r] for run in (out, straight_dir)]
    assert scores[0] == scores[1] and len(scores[0]) == 2  # both epoch ends, evaluated alike
    a, b = weights(straight_dir), weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_second_signal_stops_at_once_and_leaves_the_last_checkpoint(tmp_path, tiny, monkeypatch):
    monkeypatch.setattr(interrupt, "REPEAT_S", -1.0)  # the two signals come within microseconds here
    config = tiny_config(tmp_path, epochs=2.0, save_every_steps=2)
    with pytest.raises(Interrupted) as caught:
        engine.fit(config, model=tiny(), callbacks=[sends(signal.SIGINT, at=3, times=2)])
    assert caught.value.at_once and caught.value.checkpoint is None and caught.value.exit_code == 130
    assert "stopped at once by a second SIGINT" in str(caught.value)
    out = Path(config.output_dir)
    assert checkpoint.list_checkpoints(out) == [checkpoint.checkpoint_dir(out, 2)]
    assert checkpoint.verify(checkpoint.checkpoint_dir(out, 2)) is None


@pytest.mark.parametrize("save_every", [2, None])  # a periodic checkpoint, and the one at the end of a pass
def test_a_signal_during_a_checkpoint_write_lets_it_finish_and_stops_there(tmp_path, tiny, monkeypatch, save_every):
    seal, calls = checkpoint._seal, []

    def seal_then_signal(folder, config):
        calls.append(folder)
        os.kill(os.getpid(), signal.SIGTERM)  # in the middle of the write: after the state, before the manifest
        seal(folder, config)

    monkeypatch.setattr(checkpoint, "_seal", seal_then_signal)
    config = tiny_config(tmp_path, epochs=2.0, save_every_steps=save_every)
    with pytest.raises(Interrupted) as caught:
        engine.fit(config, model=tiny())
    written = calls[0].with_name(calls[0].name.removesuffix(".tmp"))
    assert caught.value.checkpoint == written and caught.value.step == int(written.name.split("_")[1])
    assert len(calls) == 1 and checkpoint.verify(written) is None  # written once, whole; no update after it


def test_a_signal_during_an_evaluation_drops_it_and_saves_the_update(tmp_path, tiny, monkeypatch):
    evaluate = evaluation.evaluate

    def signal_then_evaluate(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        return evaluate(*args, **kwargs)

    config = tiny_config(tmp_path, epochs=2.0, eval_every_steps=3)
    with monkeypatch.context() as m:
        m.setattr(evaluation, "evaluate", signal_then_evaluate)
        with pytest.raises(Interrupted) as caught:
            engine.fit(config, model=tiny())
    out = Path(config.output_dir)
    assert caught.value.step == 3 and checkpoint.verify(checkpoint.checkpoint_dir(out, 3)) is None
    assert not [r for r in records(out) if "f1" in r]  # the evaluation was dropped, not half recorded
    resumed = engine.fit(config.replace(resume="latest"), model=tiny())
    assert resumed["final"]["step"] == resumed["steps"] > 3


def test_an_epoch_end_evaluation_dropped_at_a_signal_comes_first_when_resumed(tmp_path, tiny, monkeypatch):
    evaluate = evaluation.evaluate

    def signal_then_evaluate(*args, **kwargs):  # the first evaluation of this run is its first epoch's end
        os.kill(os.getpid(), signal.SIGINT)
        return evaluate(*args, **kwargs)

    config = tiny_config(tmp_path, epochs=2.0, save_model=True)
    straight = engine.fit(config.replace(output_dir=str(tmp_path / "straight")), model=tiny())
    with monkeypatch.context() as m:
        m.setattr(evaluation, "evaluate", signal_then_evaluate)
        with pytest.raises(Interrupted) as caught:
            engine.fit(config, model=tiny())
    out = Path(config.output_dir)
    assert caught.value.step == straight["steps"] // 2 and not [r for r in records(out) if "f1" in r]
    engine.fit(config.replace(resume="latest"), model=tiny())
    scores = [[(r["step"], r["f1"]) for r in records(run) if "f1" in r] for run in (out, tmp_path / "straight")]
    assert scores[0] == scores[1] and len(scores[0]) == 2  # the dropped one, redone, and the final one
    a, b = weights(tmp_path / "straight"), weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a)  # evaluating on resume does not change the training


# ------------------------------------------------------------------------------------------------------ scripts


def train_until(cmd: list[str], run: Path, *, step: int) -> subprocess.Popen:
    """Start a training command and return once its log shows update `step` (or it ended)."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log, deadline = run / "train_log.jsonl", time.time() + 300
    while proc.poll() is None and time.time() < deadline:
        if log.exists() and any(json.loads(line).get("step", 0) >= step for line in log.read_text().splitlines()):
            break
        time.sleep(0.02)
    return proc


LONG = ["--epochs", "30", "--log-every", "1"]  # far longer than the signal takes to arrive


@pytest.mark.e2e
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_the_script_saves_and_exits_with_one_line_at_a_signal(tmp_path, tiny_dir, signum):
    run = tmp_path / "run"
    cmd = [
        sys.executable,
        str(ROOT / "scripts" / "train.py"),
        "--model",
        str(tiny_dir),
        *SMALL,
        *LONG,
        "--output-dir",
        str(run),
    ]
    proc = train_until(cmd, run, step=2)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=120)
    name = signal.Signals(signum).name
    assert proc.returncode == 128 + signum, err[-3000:]
    assert "Traceback" not in err and f"interrupted by {name} at update" in err and out == ""
    saved = checkpoint.latest_checkpoint(run)
    assert saved is not None and checkpoint.verify(saved) is None
    assert f"saved {saved}; run the same command with --resume latest to continue" in err.splitlines()[-1]


@pytest.mark.e2e
def test_a_signal_to_one_of_two_processes_stops_both_at_one_update(tmp_path, tiny_dir):
    args = ["--model", str(tiny_dir), *SMALL, "--epochs", "8", "--log-every", "1", "--mixed-precision", "no"]
    train = [*two_processes(), str(ROOT / "scripts" / "train.py"), *args]
    subprocess.run(
        [*train, "--output-dir", str(tmp_path / "straight")],
        cwd=ROOT,
        env=ENV,
        check=True,
        capture_output=True,
        timeout=600,
    )

    run = tmp_path / "run"
    proc = train_until([*train, "--output-dir", str(run)], run, step=2)
    workers = [p for p in psutil.Process(proc.pid).children(recursive=True) if "train.py" in " ".join(p.cmdline())]
    second = next(p for p in workers if p.environ().get("RANK") == "1")
    second.send_signal(signal.SIGTERM)  # only the second process: the first learns it at the next update
    _, err = proc.communicate(timeout=300)
    assert proc.returncode != 0 and "interrupted by SIGTERM at update" in err, err[-3000:]
    saved = checkpoint.list_checkpoints(run)
    assert len(saved) == 1 and checkpoint.verify(saved[0]) is None
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= {p.name for p in saved[0].iterdir()}  # both saved it

    result = subprocess.run(
        [*train, "--output-dir", str(run), "--resume", "latest"],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    a, b = records(tmp_path / "straight")[-1], records(run)[-1]
    assert (a["step"], a["exact"], a["f1"]) == (b["step"], b["exact"], b["f1"])
    wa, wb = weights(tmp_path / "straight"), weights(run)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.e2e
def test_a_real_write_past_a_file_size_limit_stops_with_one_line_and_keeps_the_checkpoint(tmp_path, tiny_dir):
    import resource

    run = tmp_path / "run"
    cmd = [
        sys.executable,
        str(ROOT / "scripts" / "train.py"),
        "--model",
        str(tiny_dir),
        *SMALL,
        *LONG,
        "--output-dir",
        str(run),
    ]
    proc = train_until(cmd, run, step=2)
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=120)
    before = checkpoint.latest_checkpoint(run)
    assert proc.returncode == 130 and before is not None

    def small_files() -> None:  # files over 1 MiB fail to write (EFBIG) instead of killing the process
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (2**20, 2**20))

    resumed = subprocess.run(
        [*cmd, "--resume", "latest", "--save-every-steps", "1"],
        cwd=ROOT,
        env=ENV,
        text=True,
        capture_output=True,
        timeout=300,
        preexec_fn=small_files,
    )
    lines = resumed.stderr.strip().splitlines()
    assert resumed.returncode == 2 and "Traceback" not in resumed.stderr, resumed.stderr[-3000:]
    assert lines[-1].startswith("error: could not write checkpoint ") and "File too large" in lines[-1]
    assert f"{before} is intact and stays the latest" in lines[-1]
    assert checkpoint.list_checkpoints(run) == [before] and checkpoint.verify(before) is None
    assert not list((run / "checkpoints").glob("*.tmp"))


@pytest.mark.e2e
@pytest.mark.parametrize("at", [3, 12])  # in the timed warm-up (no plan yet), and after the plan
def test_a_time_budget_run_stopped_by_a_signal_resumes_to_a_plan_of_its_own(tmp_path, tiny, monkeypatch, at):
    from bertqa.training import budget
    from tests.test_budget import budget_config, sleepy

    monkeypatch.setattr(budget, "SAFETY", 0.8)  # room to reach the planned end on a busy machine
    # Half a pass (27 updates) in 8 s: the length is the data's, not the clock's, however busy the machine.
    config = budget_config(tmp_path, epochs=0.5, time_budget="8s", save_every_steps=25)
    with pytest.raises(Interrupted) as caught:
        engine.fit(config, model=tiny(), compute_loss=sleepy(0.02), callbacks=[sends(signal.SIGTERM, at=at)])
    planned = checkpoint.saved_config(caught.value.checkpoint).get("_budget_plan")
    assert caught.value.step == at and (planned is None) == (at < budget.PROBE_UPDATES)
    resumed = engine.fit(config.replace(resume="latest"), model=tiny(), compute_loss=sleepy(0.02))
    plan = resumed["budget_plan"]
    assert resumed["steps"] == plan["total_steps"] > at and resumed["stopped_early"] is None
    if planned is not None:
        assert plan == planned  # kept, not measured again


@pytest.mark.e2e
def test_a_sigterm_to_a_one_process_launcher_reaches_the_run(tmp_path, tiny_dir):
    import shutil

    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or "accelerate"
    launch = [
        accelerate,
        "launch",
        "--num_processes",
        "1",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
    ]
    run = tmp_path / "run"
    cmd = [
        *launch,
        str(ROOT / "scripts" / "train.py"),
        "--model",
        str(tiny_dir),
        *SMALL,
        *LONG,
        "--output-dir",
        str(run),
    ]
    proc = train_until(cmd, run, step=2)
    (child,) = [p for p in psutil.Process(proc.pid).children(recursive=True) if "train.py" in " ".join(p.cmdline())]
    proc.send_signal(signal.SIGTERM)  # to the launcher alone, as a scheduler does; it passes nothing on itself
    proc.communicate(timeout=120)
    child.wait(timeout=120)  # the run, told by the system that its launcher ended, saved and stopped
    saved = checkpoint.latest_checkpoint(run)
    assert saved is not None and checkpoint.verify(saved) is None
    assert records(run)[-1]["interrupted"] == "interrupted by SIGTERM"
