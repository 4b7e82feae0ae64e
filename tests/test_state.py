"""Early stopping: the count, a plateau the tiny model really reaches, a resumed count, and refused settings."""

from __future__ import annotations

import json

import pytest

from bertqa import engine
from bertqa.config import TrainConfig
from bertqa.training.hooks import EarlyStopping
from bertqa.training.state import StopTraining, TrainState
from tests.conftest import tiny_config


def feed(stopper: EarlyStopping, f1s: list[float]) -> int | None:
    """The index of the evaluation that stops the run, or None."""
    for i, f1 in enumerate(f1s):
        try:
            stopper({"step": i, "f1": f1})
        except StopTraining:
            return i
    return None


def test_patience_counts_evaluations_in_a_row_without_a_big_enough_gain():
    assert feed(EarlyStopping(TrainState(), patience=2), [10, 12, 12, 11]) == 3  # equal is no gain
    assert feed(EarlyStopping(TrainState(), patience=2), [10, 11, 10, 12, 12, 12]) == 5  # a gain resets the count
    assert feed(EarlyStopping(TrainState(), patience=2, min_delta=1.0), [10, 10.5, 10.9]) == 2  # gains too small
    assert feed(EarlyStopping(TrainState(), patience=2, min_delta=1.0), [10, 10.5, 11.0, 11.5]) is None
    state = TrainState()
    assert feed(EarlyStopping(state, patience=3), [5, float("nan"), 6]) is None
    assert (state.patience_best, state.patience_best_step, state.evals_without_gain) == (6, 2, 0)


def test_the_stop_says_why():
    state = TrainState()
    stopper = EarlyStopping(state, patience=2)
    stopper({"step": 0, "f1": 41.0})
    stopper({"step": 1, "f1": 40.0})
    with pytest.raises(
        StopTraining,
        match=r"f1 40.00 at step 2, 2 evaluations in a row without any gain over the "
        r"best 41.00 \(step 0\)",
    ):
        stopper({"step": 2, "f1": 40.0})
    with pytest.raises(ValueError, match="patience must be at least 1"):
        EarlyStopping(state, patience=0)
    with pytest.raises(ValueError, match="min_delta must be >= 0"):
        EarlyStopping(state, patience=1, min_delta=-1)


def test_config_refuses_bad_early_stopping_settings():
    with pytest.raises(ValueError, match="early_stopping_patience must be at least 1"):
        TrainConfig(early_stopping_patience=0)
    for bad in (float("nan"), -1.0, float("inf"), 100.0):
        with pytest.raises(ValueError, match=r"early_stopping_min_delta must be in \[0, 100\)"):
            TrainConfig(early_stopping_min_delta=bad)
    assert TrainConfig(early_stopping_min_delta=0.5).unused_settings() == [
        ("early_stopping_min_delta", "early_stopping_patience")
    ]


def test_a_patience_without_evaluations_to_count_is_refused_before_training(tmp_path, tiny):
    config = tiny_config(tmp_path, early_stopping_patience=1)  # one epoch, evaluated only at its end
    with pytest.raises(ValueError, match=r"early_stopping_patience=1 can never end this run: it evaluates 0 time"):
        engine.fit(config, model=tiny())
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def plateau_config(tmp_path, **changes):
    """A learning rate too small to change any prediction: F1 stays exactly where it starts, a real plateau."""
    return tiny_config(
        tmp_path,
        lr=1e-12,
        epochs=3.0,
        batch_size=8,
        eval_every_steps=1,
        eval_before_training=True,
        early_stopping_patience=3,
        save_model=True,
        **changes,
    )


def test_a_plateau_ends_the_run_keeps_the_best_model_and_says_why(tmp_path, tiny):
    summary = engine.fit(plateau_config(tmp_path), model=tiny())
    assert summary["steps"] == 3 and summary["stopped_early"].startswith("early stopping: f1")
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "f1" in r] == [0, 1, 2, 3] and len({r["f1"] for r in records[:-1]}) == 1
    assert records[-1] == {"step": 3, "epoch": 0, "stopped": summary["stopped_early"]}
    best = json.loads((tmp_path / "run" / "best_model" / "bertqa.json").read_text())
    # The first trained evaluation had the best F1 (later ones only equalled it); the untrained model's is a
    # baseline, never kept as the best model.
    assert best["eval"]["step"] == 1


class Crash(RuntimeError):
    pass


def test_a_resumed_run_keeps_its_patience_count(tmp_path, tiny):
    def crash(update):
        if update.step == 2:  # after the evaluation and checkpoint of update 2
            raise Crash

    config = plateau_config(tmp_path, save_every_steps=1)
    with pytest.raises(Crash):
        engine.fit(config, model=tiny(), callbacks=[crash])
    resumed = engine.fit(config.replace(resume="latest"), model=tiny(seed=1))
    # counted on from 2 evaluations without a gain: a fresh count would have stopped at update 6
    assert resumed["steps"] == 3 and resumed["stopped_early"].startswith("early stopping")


def test_a_stopped_run_resumed_with_changed_settings_goes_on(tmp_path, tiny):
    config = plateau_config(tmp_path)
    assert engine.fit(config, model=tiny())["steps"] == 3
    again = engine.fit(config.replace(resume="latest", early_stopping_patience=5, accept_changes=True), model=tiny())
    assert again["steps"] == 8 and again["stopped_early"].startswith("early stopping")  # counted afresh: 3 + 5
