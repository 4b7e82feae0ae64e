"""Sweeps (tiny model): the search-space parser and its check against the base config, sampling, pruning a run, the
study file and what it is tied to, and scripts/sweep.py end to end (resume, refused reruns, failed trials, a killed or
interrupted trial run again, files that are not a study)."""

from __future__ import annotations

import csv
import importlib.util
import json
import logging
import re
import sqlite3
import time

import pytest

optuna = pytest.importorskip("optuna")

from bertqa import engine  # noqa: E402
from bertqa.config import TrainConfig, load_config  # noqa: E402
from bertqa.tune import sweep  # noqa: E402
from bertqa.tune.sweep import Param, parse_space  # noqa: E402
from tests.conftest import tiny_config  # noqa: E402
from tests.test_scripts import ROOT, SMALL, script  # noqa: E402

SWEEP = [*SMALL, "--max-steps", "2", "--log-every", "1", "--pruner", "none"]


def sweep_script(monkeypatch):
    """scripts/sweep.py as a module, to call in this process (no interpreter start), its logging setup left out."""
    spec = importlib.util.spec_from_file_location("sweep_script", ROOT / "scripts" / "sweep.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "setup_logging", lambda: None)
    return module


def test_space_from_params_and_a_file(tmp_path):
    space = parse_space(
        [
            "lr=1e-5..1e-3:log",
            "warmup_ratio=0..0.2",
            "max_steps=100..400",
            "batch_size=16,32",
            "group_by_length=true,false",
            "schedule=linear,cosine",
            "attention_dropout=none,0.0,0.1",
            "max-grad-norm=0.5,1",
            "eval_every_steps=20,40",  # bookkeeping to a resumed run, but it changes what a trial scores
        ]
    )
    assert space["lr"] == Param("lr", 1e-5, 1e-3, log=True)
    assert space["warmup_ratio"] == Param("warmup_ratio", 0.0, 0.2) and isinstance(space["warmup_ratio"].low, float)
    assert space["max_steps"] == Param("max_steps", 100, 400) and isinstance(space["max_steps"].low, int)
    assert space["batch_size"].choices == (16, 32) and space["group_by_length"].choices == (True, False)
    assert space["schedule"].choices == ("linear", "cosine")
    assert space["attention_dropout"].choices == (None, 0.0, 0.1) and space["max_grad_norm"].choices == (0.5, 1.0)

    file = tmp_path / "space.json"
    file.write_text(
        json.dumps(
            {
                "lr": "1e-5..1e-3:log",
                "schedule": ["linear", "cosine"],
                "batch_size": [16, "32"],
                "attention_dropout": [None, 0.1],
            }
        )
    )
    both = parse_space(["warmup_ratio=0..0.2"], file)
    assert (
        both["lr"] == space["lr"] and both["schedule"] == space["schedule"] and both["batch_size"].choices == (16, 32)
    )
    assert both["attention_dropout"].choices == (None, 0.1) and set(both) == {
        "warmup_ratio",
        *json.loads(file.read_text()),
    }

    values = sweep.suggest(optuna.create_study().ask(), space)  # what a trial draws, with each field's type
    assert 1e-5 <= values["lr"] <= 1e-3 and isinstance(values["max_steps"], int) and 100 <= values["max_steps"] <= 400
    assert values["batch_size"] in (16, 32) and values["schedule"] in ("linear", "cosine")


@pytest.mark.parametrize(
    ("items", "expected"),
    [
        (["nope=1,2"], "'nope': not a TrainConfig setting"),
        (["output_dir=a,b"], "'output_dir': a bookkeeping setting"),
        (["log_every=1,2"], "'log_every': a bookkeeping setting"),
        (["resume=latest"], "'resume': a bookkeeping setting"),
        (["lr=1e-3..1e-5"], "'lr': LOW must be below HIGH"),
        (["lr=1e-3..1e-3"], "'lr': LOW must be below HIGH"),
        (["lr=0..1e-3:log"], "'lr': a log-scale range needs LOW above 0"),
        (["lr=1e-3:log"], "'lr': ':log' goes with a range"),
        (["batch_size=1.5..4"], "'batch_size': expected a whole number, got '1.5'"),
        (["lr=fast,slow"], "'lr': expected a number, got 'fast'"),
        (["lr=1e-5..1e-3:lin"], "'lr': unknown scale ':lin' in '1e-5..1e-3:lin' (only ':log')"),
        (["lr=nan,1e-3"], "'lr': expected float, got nan"),
        (["group_by_length=maybe"], "'group_by_length': expected true or false"),
        (["schedule=a..b"], "'schedule': a str setting takes choices a,b,c, not a range"),
        (["schedule=linear,cosin"], "'schedule': 'cosin' is not one of linear, cosine, constant"),
        (["batch_size=16,16"], "'batch_size': a choice is given twice"),
        (["lr=1e-3,2e-3", "lr=1e-4..1e-3"], "'lr': given twice"),
        (["lr"], "'lr': expected NAME=SPEC"),
        (["lr= "], "'lr= ': expected NAME=SPEC"),
        ([], "nothing to search"),
    ],
)
def test_bad_spaces_are_refused_in_one_line(items, expected):
    with pytest.raises(ValueError) as err:
        parse_space(items)
    assert expected in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("{lr: 1}", "not valid JSON at line 1"),
        ("[]", "expected a JSON object of NAME -> SPEC"),
        ("{}", "the space is empty"),
        ('{"lr": 0.001}', "'lr': give LOW..HIGH, LOW..HIGH:log or a,b,c (or a list), got 0.001"),
        ('{"batch_size": [16, 1.5]}', "'batch_size': expected int, got 1.5"),
        ('{"nope": "1,2"}', "'nope': not a TrainConfig setting"),
    ],
)
def test_bad_space_files_are_refused_naming_the_file(tmp_path, text, expected):
    file = tmp_path / "space.json"
    file.write_text(text)
    with pytest.raises(ValueError, match=r"space\.json") as err:
        parse_space([], file)
    assert expected in str(err.value) and "\n" not in str(err.value)
    file.write_text('{"lr": "1e-4..1e-3"}')
    with pytest.raises(ValueError, match=r"'lr': given as NAME=SPEC and in .*space\.json"):
        parse_space(["lr=1e-3,2e-3"], file)


@pytest.mark.parametrize(
    ("item", "expected"),
    [
        ("warmup_ratio=0..2", "'warmup_ratio': 2.0 is refused: invalid TrainConfig: warmup_ratio must be in [0, 1)"),
        ("layer_lr_decay=0.5..1.5", "'layer_lr_decay': 1.5 is refused: invalid TrainConfig: layer_lr_decay must"),
        ("lr=-1..1", "'lr': -1.0 is refused: invalid TrainConfig: lr must be positive"),
        ("eval_split=0.1,0.2", "'eval_split': 0.1 is refused: invalid TrainConfig: give eval_data or eval_split"),
    ],
)
def test_values_every_trial_would_refuse_are_refused_before_any(tmp_path, item, expected):
    base = TrainConfig(eval_data="dev-v1.1")  # eval_split clashes with the base, not with itself
    with pytest.raises(ValueError) as err:
        sweep.make_objective(base, parse_space([item]), tmp_path)
    assert expected in str(err.value) and "\n" not in str(err.value)
    ok = parse_space(["warmup_ratio=0..0.5", "epochs=0,1"])
    sweep.check_space(base.replace(max_steps=10), ok)  # epochs 0 is fine with max_steps...
    with pytest.raises(ValueError, match=r"'epochs': 0\.0 is refused"):  # ...and not without
        sweep.check_space(base, ok)


def test_a_study_is_tied_to_its_sweep_dir_base_config_and_space(tmp_path, caplog):
    study = optuna.create_study(direction="maximize")
    base, space, here = TrainConfig(max_steps=4), parse_space(["lr=1e-4..1e-2:log"]), tmp_path / "a"
    sweep.claim_study(study, base, space, here)
    held = study.user_attrs
    assert held["sweep_dir"] == str(here.resolve()) and held["space"] == {"lr": "0.0001..0.01:log"}
    assert held["base"]["max_steps"] == 4 and not {"lr", "log_every", "output_dir"} & set(held["base"])
    with caplog.at_level(logging.WARNING, logger="bertqa"):  # no trial has a score yet: nothing to compare with
        sweep.claim_study(study, base.replace(seed=1), space, here)
    assert "seed 42 -> 1" in caplog.text and study.user_attrs["base"]["seed"] == 1
    base = base.replace(seed=1)
    lr = optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True)
    study.add_trial(optuna.trial.create_trial(params={"lr": 1e-3}, distributions={"lr": lr}, value=50.0))
    sweep.claim_study(study, base.replace(log_every=3, output_dir="x"), space, here)  # bookkeeping: no change
    for new_base, new_space, expected in (
        (base.replace(max_steps=2), space, "max_steps 4 -> 2"),
        (base.replace(eval_every_steps=2), space, "eval_every_steps None -> 2"),  # it changes what a trial scores
        (base, parse_space(["lr=1e-4..1e-3:log"]), "searched lr 0.0001..0.01:log -> 0.0001..0.001:log"),
        (base, {**space, **parse_space(["batch_size=4,8"])}, "searched batch_size not searched -> 4,8"),
    ):
        with pytest.raises(ValueError, match="pass --allow-changed-base to add to it anyway") as err:
            sweep.claim_study(study, new_base, new_space, here)
        assert expected in str(err.value) and "\n" not in str(err.value)
    with caplog.at_level(logging.WARNING, logger="bertqa"):
        sweep.claim_study(study, base.replace(max_steps=2), space, here, allow_changes=True)
    assert "max_steps 4 -> 2" in caplog.text and study.user_attrs["base"]["max_steps"] == 2
    elsewhere = tmp_path / "b" / "a"  # the same last name: the default study name of both
    with pytest.raises(ValueError, match=re.escape(f"holds the trials of {here.resolve()}, not of")):
        sweep.claim_study(study, base.replace(max_steps=2), space, elsewhere)


def test_failed_trials_are_reported_with_the_first_error_and_what_to_do(tmp_path, monkeypatch, capsys):
    report = sweep_script(monkeypatch).report
    study = optuna.create_study(direction="maximize")
    for error in ("ValueError: the model has 4 layers, num_layers 9", "ValueError: another"):
        study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.FAIL, user_attrs={"error": error}))
    assert report(study, tmp_path, 2) == 1  # a rerun would run nothing: say so, and why they failed
    out = capsys.readouterr().out
    assert (
        "all 2 finished trials failed (first error, trial 0: ValueError: the model has 4 layers, num_layers 9); "
        "raise --trials or start a new --output-dir"
        in out
        and "no trial has completed yet" not in out
    )
    config = TrainConfig(max_steps=2).to_dict()
    study.add_trial(optuna.trial.create_trial(value=50.0, user_attrs={"config": config}))
    assert report(study, tmp_path, 3) == 0
    assert "2 failed; first error, trial 0: ValueError: the model has 4 layers" in capsys.readouterr().out


def test_pruning_observer_reports_f1_and_stops_a_trial_the_pruner_prunes():
    pruned = optuna.create_study(direction="maximize", pruner=optuna.pruners.ThresholdPruner(lower=1e9)).ask()
    observer = sweep.PruningObserver(pruned)
    with pytest.raises(engine.StopTraining, match="pruned by optuna at step 3"):
        observer({"step": 3, "f1": 12.5})
    assert observer.pruned_at == 3
    kept = optuna.create_study(direction="maximize", pruner=optuna.pruners.NopPruner()).ask()
    sweep.PruningObserver(kept)({"step": 4, "f1": 20.0})
    assert kept.study.trials[0].intermediate_values == {4: 20.0}


def test_a_pruned_run_stops_and_its_trial_is_recorded_pruned(tmp_path, tiny_dir):
    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.ThresholdPruner(lower=1e9))
    base = tiny_config(tmp_path, model=str(tiny_dir), max_steps=4, eval_before_training=True, save_every_steps=1)
    space = parse_space(["lr=1e-4..1e-2:log"])
    sweep.run_trials(study, sweep.make_objective(base, space, tmp_path / "sweep"), 1)
    (trial,) = study.trials
    assert trial.state == optuna.trial.TrialState.PRUNED and trial.user_attrs["steps"] == 0  # stopped before training
    assert set(trial.intermediate_values) == {0} and trial.value == trial.user_attrs["best_f1_seen"]
    assert trial.user_attrs["stopped"] == "pruned by optuna at step 0"
    run = tmp_path / "sweep" / "trial-000"
    assert (run / "metrics.jsonl").is_file() and not (run / "checkpoints").exists()  # never resumed: freed


@pytest.mark.e2e
def test_sweep_script_runs_resumes_and_reports(tmp_path, tiny_dir):
    out = tmp_path / "sweep"
    args = ["--model", tiny_dir, *SWEEP, "--param", "lr=1e-4..1e-2:log", "--param", "schedule=linear,cosine"]
    first = script("sweep.py", *args, "--trials", "2", "--output-dir", out)
    assert "best: trial" in first.stdout and f"--config {out / 'best_config.json'}" in first.stdout
    study = optuna.load_study(study_name="sweep", storage=f"sqlite:///{out / 'study.db'}")
    started = [t.datetime_start for t in study.trials]
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]

    script("sweep.py", *args, "--trials", "3", "--output-dir", out)  # one more; the first two are kept
    study = optuna.load_study(study_name="sweep", storage=f"sqlite:///{out / 'study.db'}")
    assert [t.datetime_start for t in study.trials[:2]] == started and len(study.trials) == 3
    assert sorted(p.name for p in out.glob("trial-*")) == ["trial-000", "trial-001", "trial-002"]

    other = script("sweep.py", *args, "--study-name", "other", "--output-dir", out, check=False)
    assert other.returncode == 2 and "holds the trials of study 'sweep'" in other.stderr
    assert optuna.get_all_study_names(f"sqlite:///{out / 'study.db'}") == ["sweep"]

    (out / "trials.csv").unlink()  # a study with all its trials runs none, and still writes the results
    again = script("sweep.py", *args, "--trials", "3", "--output-dir", out)
    assert "Trial 3" not in again.stderr
    assert len(optuna.load_study(study_name="sweep", storage=f"sqlite:///{out / 'study.db'}").trials) == 3
    best = max(study.trials, key=lambda t: t.value)
    config = load_config(out / "best_config.json")
    assert config.lr == best.params["lr"] and config.schedule == best.params["schedule"]
    assert config.max_steps == 2 and config.output_dir == str(out / "best") and config.save_model
    with (out / "trials.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["trial"] for r in rows] == ["0", "1", "2"] and {r["state"] for r in rows} == {"COMPLETE"}
    assert (
        float(rows[best.number]["f1"]) == round(best.value, 2) and float(rows[0]["lr"]) == study.trials[0].params["lr"]
    )
    assert (out / "trials.png").stat().st_size > 0 and "| trial | state | f1 |" in (out / "trials.md").read_text()


def test_sweep_script_refuses_a_rerun_that_would_mix_or_overwrite_trials(tmp_path, tiny_dir, monkeypatch, capsys):
    main = sweep_script(monkeypatch).main
    out = tmp_path / "sweep"
    args = ["--model", str(tiny_dir), *SWEEP, "--param", "lr=1e-4..1e-2:log", "--output-dir", str(out)]
    study = sweep.open_study(out / "study.db", "sweep")
    sweep.claim_study(study, load_config_of(main, args, capsys), parse_space(["lr=1e-4..1e-2:log"]), out)
    lr = optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True)
    study.add_trial(optuna.trial.create_trial(params={"lr": 1e-3}, distributions={"lr": lr}, value=50.0))
    (out / "sweep.json").write_text(json.dumps({"study_name": "sweep", "storage": str((out / "study.db").resolve())}))
    other = tmp_path / "other.db"
    for extra, expected in (
        (["--max-steps", "3"], "(max_steps 2 -> 3): its trials would not compare with new ones"),
        (["--param", "warmup_ratio=0..0.2"], "searched warmup_ratio not searched -> 0.0..0.2"),
        (["--storage", str(other)], f"in {(out / 'study.db').resolve()}, not in {other}"),
        (["--output-dir", str(tmp_path / "b" / "sweep"), "--storage", str(out / "study.db")], "holds the trials of"),
        (["--resume", "latest"], "--resume is not a sweep setting"),
        (["--overwrite", "true"], "--overwrite is not a sweep setting"),
        (["--param", "warmup_ratio=0..2"], "'warmup_ratio': 2.0 is refused"),
    ):
        with pytest.raises(ValueError) as err:
            main([*args, *extra, "--trials", "1"])
        assert expected in str(err.value) and "\n" not in str(err.value), err.value
    assert not list(out.glob("trial-*")) and not other.exists()
    assert len(study.trials) == 1 and study.user_attrs["base"]["max_steps"] == 2


def load_config_of(main, args, capsys) -> TrainConfig:
    """The config a trial runs (--print-config), with the searched settings back at their defaults."""
    assert main([*args, "--print-config"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown.pop("_searched") == {"lr": "0.0001..0.01:log"} and "lr" not in shown
    assert shown["save_model"] is False and shown["output_dir"].endswith("trial-NNN") and shown["max_steps"] == 2
    return TrainConfig(**shown)


@pytest.mark.e2e
def test_failed_trials_are_recorded_with_their_error_and_the_sweep_goes_on(tmp_path, tiny_dir):
    out = tmp_path / "sweep"
    study = sweep.open_study(out / "study.db", "sweep")
    study.enqueue_trial({"lr": 1e5, "epochs": 1.0, "max_steps": 2})  # a NaN loss
    study.enqueue_trial({"lr": 1e-3, "epochs": 0.0, "max_steps": None})  # each fine alone, refused together
    study.enqueue_trial({"lr": 1e-3, "epochs": 1.0, "max_steps": 2})
    space = ["--param", "lr=1e-4..1e6:log", "--param", "epochs=0,1", "--param", "max_steps=none,2"]
    args = [*space, "--trials", "3", "--output-dir", out]
    result = script("sweep.py", "--model", tiny_dir, *SWEEP, *args)
    trials = optuna.load_study(study_name="sweep", storage=f"sqlite:///{out / 'study.db'}").trials
    assert [t.state.name for t in trials] == ["FAIL", "FAIL", "COMPLETE"]
    assert "nan" in trials[0].user_attrs["error"].lower()  # the loss, or the scores of the evaluation after it
    refused = "ValueError: invalid TrainConfig: epochs must be positive (or set max_steps)"
    assert trials[1].user_attrs["error"] == refused
    assert "best: trial 2" in result.stdout and "2 fail" in result.stdout
    assert f"2 failed; first error, trial 0: {trials[0].user_attrs['error']}" in result.stdout
    with (out / "trials.csv").open() as f:
        errors = [r["error"] for r in csv.DictReader(f)]
    assert errors[1] == trials[1].user_attrs["error"] and errors[2] == ""


@pytest.mark.e2e
@pytest.mark.filterwarnings("ignore:Heartbeat of storage:UserWarning")  # the trial asked for stands in for a dead one
def test_a_killed_trial_is_failed_and_run_again_with_its_values(tmp_path, tiny_dir):
    study = sweep.open_study(tmp_path / "study.db", "s", heartbeat_interval=1, grace_period=1)
    study.enqueue_trial({"lr": 2e-3})
    killed = study.ask()  # a trial whose process died: running, its heartbeat stopped
    killed.suggest_float("lr", 1e-4, 1e-2, log=True)
    study._storage.record_heartbeat(killed._trial_id)  # what the dead process's heartbeat thread did last
    time.sleep(2.5)
    base = tiny_config(tmp_path, model=str(tiny_dir), max_steps=2)
    objective = sweep.make_objective(base, parse_space(["lr=1e-4..1e-2:log"]), tmp_path / "sweep")
    sweep.run_trials(study, objective, 1)
    first, retry = study.trials
    assert first.state.name == "FAIL" and retry.state.name == "COMPLETE" and retry.params == {"lr": 2e-3}
    assert [t.number for t in sweep.counted_trials(study)] == [1]  # the retry counts, not the failed run


def test_an_interrupted_trial_stops_the_sweep_and_runs_first_on_resume(tmp_path, monkeypatch, capfd):
    def interrupted(config, **_):
        raise KeyboardInterrupt

    script_module = sweep_script(monkeypatch)
    study = optuna.create_study(direction="maximize")
    objective = sweep.make_objective(tiny_config(tmp_path), parse_space(["lr=1e-4..1e-2:log"]), tmp_path / "sweep")
    monkeypatch.setattr(engine, "fit", interrupted)
    optuna_log = logging.getLogger("optuna.study._optimize")
    optuna_log.addFilter(quiet := script_module.QuietInterrupt())  # as scripts/sweep.py runs its trials
    try:
        with pytest.raises(KeyboardInterrupt):
            sweep.run_trials(study, objective, 3)
    finally:
        optuna_log.removeFilter(quiet)
    assert "Traceback" not in capfd.readouterr().err  # the summary comes next, not Optuna's traceback of Ctrl-C
    assert [t.state.name for t in study.trials] == ["FAIL", "WAITING"] and sweep.counted_trials(study) == []
    stopped = "no F1 gain of 0.0 in 2 evaluations"  # early stopping, which is not pruning
    monkeypatch.setattr(engine, "fit", lambda config, **_: {"steps": 1, "best_f1_seen": 50.0, "stopped_early": stopped})
    sweep.run_trials(study, objective, 1)
    assert study.trials[1].params == study.trials[0].params and study.trials[1].state.name == "COMPLETE"
    assert len(study.trials) == 2
    rows = script_module.trial_rows(study)
    assert rows[1]["stopped"] == stopped and rows[0]["stopped"] == "" and "run again as trial 1" in rows[0]["error"]


def test_a_file_that_is_not_a_study_is_refused_before_any_training(tmp_path, tiny_dir):
    text = tmp_path / "notes.db"
    text.write_text("my notes\n")
    other = tmp_path / "other.db"
    with sqlite3.connect(other) as db:
        db.execute("CREATE TABLE results (name TEXT, score REAL)")
    db.close()
    for path, reason in ((text, "not an SQLite database"), (other, "an SQLite database without Optuna's tables")):
        with pytest.raises(ValueError, match=reason):
            sweep.open_study(path, "s")
    with pytest.raises(ValueError, match="a folder, not a study file"):
        sweep.open_study(tmp_path, "s")
    out = tmp_path / "sweep"
    for path in (text, other):
        args = ["--param", "lr=1e-4..1e-2:log", "--storage", path, "--output-dir", out]
        result = script("sweep.py", "--model", tiny_dir, *SWEEP, *args, check=False)
        assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
        assert result.stderr.startswith(f"error: {path}: ") and not list(out.glob("trial-*"))
    with sqlite3.connect(f"{other.as_uri()}?mode=ro", uri=True) as db:  # left as it was: no tables added
        assert [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")] == ["results"]
    db.close()
    assert text.read_text() == "my notes\n"


def test_a_grid_sweep_runs_every_combination_once(tmp_path, tiny_dir):
    out = tmp_path / "grid"
    args = ["--model", tiny_dir, *SWEEP, "--param", "lr=1e-4,1e-3", "--param", "schedule=linear,cosine"]
    script("sweep.py", *args, "--sampler", "grid", "--output-dir", out)  # --trials 20 by default: the grid's 4
    study = optuna.load_study(study_name="grid", storage=f"sqlite:///{out / 'study.db'}")
    seen = sorted((t.params["lr"], t.params["schedule"]) for t in study.trials)
    assert seen == [(1e-4, "cosine"), (1e-4, "linear"), (1e-3, "cosine"), (1e-3, "linear")]
    assert {t.state.name for t in study.trials} == {"COMPLETE"}


def test_a_grid_over_a_range_is_refused():
    with pytest.raises(ValueError, match=r"a grid sweep takes choices only .*: lr"):
        sweep.grid_sampler(parse_space(["lr=1e-4..1e-3", "batch_size=8,16"], None), seed=0)
    assert sweep.grid_size(parse_space(["batch_size=8,16", "schedule=linear,cosine,constant"], None)) == 6
