"""The hook protocol: the events a hook is told and their order, a stop from a hook, a hook's state across a
resume compared with a run that was never interrupted, a checkpoint written before the protocol resuming as one of
today's, and what `fit` says of a model built before it set the seed."""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path

import pytest
import torch

from bertqa import engine
from bertqa.engine import Hook, StopTraining
from tests.conftest import tiny_config

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "checkpoint_before_hooks"


class Events(Hook):
    """Writes down each event it is told."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, int]] = []

    def on_resume(self, run, checkpoint):
        self.seen.append(("resume", run.state.step))

    def on_start(self, run):
        self.seen.append(("start", run.state.step))

    def on_update(self, run, update):
        self.seen.append(("update", update.step))

    def on_evaluate(self, run, record):
        self.seen.append(("evaluate", record["step"]))

    def on_save(self, run, folder):
        self.seen.append(("save", int(folder.name.split("_")[1])))

    def on_pass_end(self, run, stats):
        self.seen.append(("pass_end", run.state.step))

    def on_end(self, run, summary):
        self.seen.append(("end", summary["steps"]))


def test_a_hook_is_told_each_event_in_the_order_the_run_meets_them(tmp_path, tiny):
    events = Events()
    summary = engine.fit(
        tiny_config(tmp_path, batch_size=8, eval_every_steps=2, save_every_steps=3), model=tiny(), hooks=[events]
    )
    steps = summary["steps"]  # 40 questions, batches of 8 windows: a handful of updates in the one pass
    assert events.seen[0] == ("start", 0) and events.seen[-1] == ("end", steps)
    assert [s for kind, s in events.seen if kind == "update"] == list(range(1, steps + 1))
    evaluated = [s for kind, s in events.seen if kind == "evaluate"]
    assert evaluated == [*range(2, steps, 2), steps]  # every 2 updates, and at the pass's end
    saved = [s for kind, s in events.seen if kind == "save"]
    assert saved[:-1] == list(range(3, steps + 1, 3)) and saved[-1] == steps  # every 3 updates, and the pass's end
    # The pass's end, then its evaluation and checkpoint (bertqa's `Periodic` hook comes after the user's), the end.
    assert events.seen[-4:] == [("pass_end", steps), ("evaluate", steps), ("save", steps), ("end", steps)]
    assert "resume" not in {kind for kind, _ in events.seen}


class StopAt(Hook):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_update(self, run, update):
        if update.step == self.step:
            raise StopTraining()


def test_a_hook_stops_the_run_which_ends_as_usual_and_names_the_hook(tmp_path, tiny):
    config = tiny_config(tmp_path, epochs=3.0, batch_size=4)
    summary = engine.fit(config, model=tiny(), hooks=[StopAt(4)])
    assert summary["steps"] == 4 and summary["stopped_early"] == "StopTraining from StopAt"
    assert summary["final"]["step"] == 4  # evaluated where it stopped
    events = Events()  # resumed, it stays stopped: it starts, trains nothing, saves nothing new, ends
    again = engine.fit(config.replace(resume="latest"), model=tiny(), hooks=[events])
    assert again["steps"] == 4 and [kind for kind, _ in events.seen] == ["resume", "start", "end"]


class LossWatch(Hook):
    """The README's hook: a moving average of the loss, the gradient norm every few updates, a stop on a blow-up."""

    def __init__(self, decay: float = 0.9, every: int = 2) -> None:
        self.decay, self.every, self.average = decay, every, None
        self.norms: list[tuple[int, float]] = []

    def on_update(self, run, update):
        loss = update.loss.item()
        self.average = loss if self.average is None else self.decay * self.average + (1 - self.decay) * loss
        if update.step % self.every == 0:
            self.norms.append((update.step, update.grad_norm.item()))
        if not math.isfinite(loss) or loss > 10 * self.average:
            raise StopTraining(f"loss {loss:.2f} at step {update.step}")

    def state_dict(self):
        return {"average": self.average, "norms": self.norms}

    def load_state_dict(self, state):
        self.average, self.norms = state["average"], state["norms"]


class Crash(RuntimeError):
    pass


def crash_at(step: int):
    def crash(update):
        if update.step == step:
            raise Crash

    return crash


def test_a_hooks_state_survives_a_resume_as_if_the_run_was_never_interrupted(tmp_path, tiny):
    kwargs = dict(epochs=2.0, batch_size=4, save_every_steps=3, keep_checkpoints=5, mixed_precision="no")
    straight = LossWatch()
    engine.fit(tiny_config(tmp_path / "a", **kwargs), model=tiny(), hooks=[straight])
    with pytest.raises(Crash):  # killed at update 5: its last checkpoint holds update 3
        engine.fit(tiny_config(tmp_path / "b", **kwargs), model=tiny(), hooks=[LossWatch()], callbacks=[crash_at(5)])
    resumed = LossWatch()  # a new object, as a new process has: everything comes from the checkpoint
    engine.fit(tiny_config(tmp_path / "b", resume="latest", **kwargs), model=tiny(seed=3), hooks=[resumed])
    assert resumed.average == pytest.approx(straight.average, rel=1e-5)
    assert [s for s, _ in resumed.norms] == [s for s, _ in straight.norms]  # none lost, none twice
    assert [n for _, n in resumed.norms] == pytest.approx([n for _, n in straight.norms], rel=1e-4)
    assert all(math.isfinite(n) and n > 0 for _, n in straight.norms)  # the norm clipping returned, every update


def test_a_hook_without_state_and_a_new_hook_on_resume_start_afresh(tmp_path, tiny):
    kwargs = dict(epochs=2.0, batch_size=4, save_every_steps=3)
    with pytest.raises(Crash):
        engine.fit(tiny_config(tmp_path, **kwargs), model=tiny(), callbacks=[crash_at(5)])
    watch = LossWatch()  # not there when the checkpoint was written: nothing to give back, it starts counting now
    engine.fit(tiny_config(tmp_path, resume="latest", **kwargs), model=tiny(), hooks=[watch])
    assert watch.norms[0][0] == 4 and watch.average is not None


def test_the_gradient_norm_is_none_without_clipping(tmp_path, tiny):
    norms = []
    engine.fit(
        tiny_config(tmp_path, max_steps=3, max_grad_norm=0.0),
        model=tiny(),
        callbacks=[lambda update: norms.append(update.grad_norm)],
    )
    assert norms == [None, None, None]


FIXTURE_SETTINGS = dict(
    epochs=2.0,
    batch_size=4,
    save_every_steps=3,
    keep_checkpoints=1,
    eval_every_steps=2,
    early_stopping_patience=6,
    mixed_precision="no",
    save_optimizer_state=False,
)


def test_a_checkpoint_written_before_the_hook_protocol_resumes_as_one_of_todays(tmp_path, tiny, caplog):
    old = tmp_path / "old"
    shutil.copytree(FIXTURE, old / "run")
    with pytest.raises(Crash):  # today's code, the same run, stopped the same way
        engine.fit(tiny_config(tmp_path / "new", **FIXTURE_SETTINGS), model=tiny(), callbacks=[crash_at(5)])
    ends = {}
    for name in ("old", "new"):
        model = tiny(seed=9)  # its weights come from the checkpoint
        watch = Events()
        with caplog.at_level(logging.INFO, logger="bertqa"):
            summary = engine.fit(
                tiny_config(tmp_path / name, resume="latest", **FIXTURE_SETTINGS), model=model, hooks=[watch]
            )
        assert ("resume", 3) in watch.seen
        log = [json.loads(x) for x in (tmp_path / name / "run" / "train_log.jsonl").read_text().splitlines()]
        ends[name] = (summary, log, {k: v.clone() for k, v in model.state_dict().items()})
    (old_summary, old_log, old_weights), (new_summary, new_log, new_weights) = ends["old"], ends["new"]
    assert old_summary["steps"] == new_summary["steps"] > 3
    assert old_summary["final"]["f1"] == pytest.approx(new_summary["final"]["f1"])
    assert [r["step"] for r in old_log] == [r["step"] for r in new_log]
    losses = [[r["loss"] for r in log if "loss" in r] for log in (old_log, new_log)]
    assert len(losses[0]) > 3 and losses[0] == pytest.approx(losses[1], rel=1e-5)
    for name, weights in old_weights.items():
        assert torch.allclose(weights, new_weights[name], atol=1e-6), name


def test_fit_says_a_model_built_before_it_did_not_get_the_runs_seed(tmp_path, tiny, caplog):
    with caplog.at_level(logging.INFO, logger="bertqa"):
        engine.fit(tiny_config(tmp_path, max_steps=1, seed=5), model=tiny())
    assert "the model passed in was built before fit set seed 5" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="bertqa"):
        engine.fit(tiny_config(tmp_path / "own", max_steps=1, seed=5))
    assert "built before fit set seed" not in caplog.text


KILLED_RUN = """
import os, signal, sys
sys.path.insert(0, {root!r})
from pathlib import Path
from bertqa import engine
from tests.conftest import make_tiny, tiny_config
from tests.test_hooks import LossWatch

def kill(update):
    if update.step == 5:  # after the checkpoint of update 3: no handler, no cleanup, as the machine would
        os.kill(os.getpid(), signal.SIGKILL)

engine.fit(tiny_config(Path({out!r}), **{kwargs!r}), model=make_tiny(), hooks=[LossWatch()], callbacks=[kill])
"""


@pytest.mark.e2e
def test_a_hooks_state_survives_a_kill(tmp_path, tiny):
    import subprocess
    import sys

    kwargs = dict(epochs=2.0, batch_size=4, save_every_steps=3, keep_checkpoints=5, mixed_precision="no")
    straight = LossWatch()
    engine.fit(tiny_config(tmp_path / "a", **kwargs), model=tiny(), hooks=[straight])
    root = str(Path(__file__).resolve().parent.parent)
    code = KILLED_RUN.format(root=root, out=str(tmp_path / "b"), kwargs=kwargs)
    killed = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr[-2000:]
    resumed = LossWatch()
    engine.fit(tiny_config(tmp_path / "b", resume="latest", **kwargs), model=tiny(seed=3), hooks=[resumed])
    assert resumed.average == pytest.approx(straight.average, rel=1e-5)
    assert [s for s, _ in resumed.norms] == [s for s, _ in straight.norms]
    assert [n for _, n in resumed.norms] == pytest.approx([n for _, n in straight.norms], rel=1e-4)


class StopOnSave(Hook):
    def on_save(self, run, folder):
        if run.state.step == 2:
            raise StopTraining("enough")


class StopOnResume(Hook):
    def on_resume(self, run, checkpoint):
        raise StopTraining("stopped on resume")


def test_a_stop_from_a_save_or_a_resume_is_kept_in_the_checkpoint(tmp_path, tiny):
    settings = dict(max_steps=6, save_every_steps=2)
    events = Events()
    stopped = engine.fit(tiny_config(tmp_path / "a", **settings), model=tiny(), hooks=[StopOnSave(), events])
    assert (stopped["steps"], stopped["stopped_early"]) == (2, "enough")
    saves = [step for kind, step in events.seen if kind == "save"]
    assert saves == [2, 2]  # the periodic one, then again with its stop (each told once per write)
    again = engine.fit(tiny_config(tmp_path / "a", resume="latest", **settings), model=tiny())
    assert (again["steps"], again["stopped_early"]) == (2, "enough")  # stays stopped
    with pytest.raises(Crash):
        engine.fit(tiny_config(tmp_path / "b", **settings), model=tiny(), callbacks=[crash_at(3)])
    engine.fit(tiny_config(tmp_path / "b", resume="latest", **settings), model=tiny(), hooks=[StopOnResume()])
    again = engine.fit(tiny_config(tmp_path / "b", resume="latest", **settings), model=tiny())
    assert (again["steps"], again["stopped_early"]) == (2, "stopped on resume")


def test_each_checkpoint_is_told_once(tmp_path, tiny):
    events = Events()
    summary = engine.fit(tiny_config(tmp_path, max_steps=8, save_every_steps=4), model=tiny(), hooks=[events])
    assert summary["steps"] == 8 and [s for kind, s in events.seen if kind == "save"] == [4, 8]


class Unsaveable(Hook):
    def state_dict(self):
        return {"rows": (i for i in range(3))}  # a generator cannot be pickled


class Failing(Hook):
    def state_dict(self):
        raise RuntimeError("state could not be built")


@pytest.mark.parametrize("hook", [Unsaveable(), Failing()])
def test_a_hook_whose_state_cannot_be_saved_is_named(tmp_path, tiny, hook):
    with pytest.raises(TypeError, match=rf"hook {type(hook).__name__}: its state_dict\(\) cannot be saved"):
        engine.fit(tiny_config(tmp_path, max_steps=4, save_every_steps=2), model=tiny(), hooks=[hook])
    assert not list((tmp_path / "run" / "checkpoints").glob("*.tmp"))


def test_what_is_not_a_hook_is_refused_before_anything_is_written(tmp_path, tiny):
    config = tiny_config(tmp_path, max_steps=2)
    with pytest.raises(TypeError, match=r"hooks\[0\] is the class LossWatch: pass an instance, LossWatch\(\)"):
        engine.fit(config, model=tiny(), hooks=[LossWatch])
    with pytest.raises(TypeError, match=r"hooks\[1\] is function, .* goes in callbacks="):
        engine.fit(config, model=tiny(), hooks=[LossWatch(), lambda update: None])
    assert not (tmp_path / "run" / "config.json").exists()


class Shorten(Hook):
    def on_update(self, run, update):
        if update.step == 4:
            run.total_steps = 5


class StopAtEnd(Hook):
    def on_end(self, run, summary):
        raise StopTraining("too late")


def test_a_hook_that_lowers_total_steps_ends_the_run_there_and_a_stop_at_the_end_is_ignored(tmp_path, tiny, caplog):
    with caplog.at_level(logging.WARNING, logger="bertqa"):
        summary = engine.fit(tiny_config(tmp_path, max_steps=8), model=tiny(), hooks=[Shorten(), StopAtEnd()])
    assert summary["steps"] == 5 and summary["final"]["step"] == 5 and summary["stopped_early"] is None
    assert "StopTraining from StopAtEnd.on_end is ignored: the run had ended" in caplog.text


def test_early_stopping_never_stops_a_run_at_its_final_evaluation():
    # A time budget may plan fewer evaluations than early stopping needs (it warns): the evaluation after the last
    # update can then be the one that would end the run. It has nothing left to stop.
    from types import SimpleNamespace

    from bertqa.engine import EarlyStopping, TrainState

    state = TrainState(step=6)
    stopper = EarlyStopping(state, patience=1)
    run = SimpleNamespace(state=state, end=6)  # where the run ends
    stopper.on_evaluate(run, {"step": 6, "f1": 5.0})
    stopper.on_evaluate(run, {"step": 6, "f1": 4.0})  # no gain, patience used up: still no stop at the end
    run.end = 10
    stopper.on_evaluate(run, {"step": 6, "f1": 5.0})
    with pytest.raises(StopTraining):
        stopper.on_evaluate(run, {"step": 6, "f1": 4.0})
