"""The scripts' shared command line (`bertqa.cli`): one spelling of yes/no flags and precision in every script,
defaults in --help, short answers to mistyped flags, and the line that explains accelerate launch's traceback."""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bertqa import cli
from bertqa.training import runtime

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = sorted(p.name for p in (ROOT / "scripts").glob("*.py"))
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def run_script(name: str, *args: str, launch: list[str] | None = None) -> subprocess.CompletedProcess:
    cmd = [*(launch or [sys.executable]), str(ROOT / "scripts" / name), *map(str, args)]
    return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"script_{Path(name).stem}", ROOT / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parser() -> cli.ScriptParser:
    p = cli.script_parser("test")
    p.add_argument("model")
    p.add_argument("--lr", type=float, default=1e-4, help="peak learning rate")
    p.add_argument("--data", help="data (default: the recorded one)")
    p.add_flag("--overwrite", help="replace")
    p.add_flag("--fuse", default=True, help="fused operators")
    p.add_flag("--no-fuse", dest="fuse", negate=True, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    p.add_precision(help="autocast precision")
    return p


@pytest.mark.parametrize(
    ("args", "overwrite"),
    [
        ([], False),
        (["--overwrite"], True),
        (["--overwrite", "true"], True),
        (["--overwrite", "yes"], True),
        (["--overwrite", "1"], True),
        (["--overwrite", "false"], False),
        (["--overwrite", "No"], False),
        (["--overwrite", "0"], False),
        (["--overwrite=false"], False),
    ],
)
def test_a_yes_no_flag_is_taken_bare_or_with_a_value_on_either_side_of_a_positional(args, overwrite):
    assert parser().parse_args([*args, "runs/x/final_model"]).overwrite is overwrite
    after = parser().parse_args(["runs/x/final_model", *args])
    assert after.overwrite is overwrite and after.model == "runs/x/final_model"


def test_a_bare_flag_before_a_positional_does_not_swallow_it():
    args = parser().parse_args(["--overwrite", "runs/x/final_model", "--no-fuse"])
    assert (args.overwrite, args.model, args.fuse) == (True, "runs/x/final_model", False)
    assert parser().parse_args(["m", "--no-fuse", "false"]).fuse is True
    assert parser().parse_args(["m", "--fuse", "false"]).fuse is False
    assert parser().parse_args(["m"]).fuse is True


def test_precision_has_one_name_everywhere_and_the_old_one_still_works():
    assert parser().parse_args(["m", "--mixed-precision", "bf16"]).mixed_precision == "bf16"
    assert parser().parse_args(["m", "--precision", "no"]).mixed_precision == "no"
    assert parser().parse_args(["m"]).mixed_precision == "auto"
    help_text = parser().format_help()
    assert "--mixed-precision" in help_text and "--precision {" not in help_text  # the alias is not listed


def test_help_shows_defaults_once_and_not_none():
    text = " ".join(parser().format_help().split())
    assert "peak learning rate (default: 0.0001)" in text
    assert "replace (default: false)" in text and "fused operators (default: true)" in text
    assert "(default: the recorded one)" in text and "(default: None)" not in text
    assert text.count("default:") == 5  # lr, overwrite, fuse, mixed-precision, data


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["m", "--lrr", "1e-4"], "unknown flag --lrr; did you mean --lr?"),
        (["--dat", "x"], "unknown flag --dat; did you mean --data?"),  # before the missing positional
        (["m", "--over_write"], "unknown flag --over_write; did you mean --overwrite?"),
        (["m", "-lr", "1"], "unknown flag -lr; did you mean --lr?"),
        (["m", "--precison", "no"], "unknown flag --precison; did you mean --precision?"),
        (["m", "--zzzzzz"], "unknown flag --zzzzzz\n"),
        (["m", "--lr", "abc"], "argument --lr: invalid float value: 'abc'"),
        (["m", "--overwrite=maybe"], "argument --overwrite: expected true/false"),
        (["m", "--mixed-precision", "fp8"], "argument --mixed-precision: invalid choice: 'fp8'"),
        (["m", "n"], "unexpected argument: n"),
    ],
)
def test_a_mistake_is_answered_in_two_lines_not_the_usage(capsys, args, said):
    with pytest.raises(SystemExit) as stop:
        parser().parse_args(args)
    err = capsys.readouterr().err
    assert stop.value.code == 2
    assert said in err and "usage:" not in err
    assert err.splitlines()[-1].endswith("--help lists every flag with its default") and len(err.splitlines()) == 2


def test_a_negative_number_is_a_value_not_a_flag():
    p = cli.script_parser("test")
    p.add_argument("--threshold", type=float)
    assert p.parse_args(["--threshold", "-1.5"]).threshold == -1.5
    assert p.parse_args(["--threshold", "-1e-3"]).threshold == -1e-3


def test_train_flags_take_the_same_yes_no_forms():
    p = cli.config_parser("train")
    assert p.parse_args(["--overwrite"]).overwrite is True
    assert p.parse_args(["--overwrite", "--lr", "1e-3"]).overwrite is True
    assert p.parse_args(["--overwrite", "false"]).overwrite is False
    assert p.parse_args(["--eval-before-training", "no"]).eval_before_training is False
    assert p.parse_args(["--precision", "bf16"]).mixed_precision == "bf16"
    assert cli.config_from_args(p.parse_args(["--precision", "no"])).mixed_precision == "no"
    assert not hasattr(p.parse_args([]), "overwrite")  # a flag not given leaves the preset's value


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_script_shares_the_parser(name, capsys):
    """Each script's --help works, shows defaults, and answers a mistyped flag briefly."""
    module = load_script(f"scripts/{name}")
    entry = getattr(module, "parse_args", None) or module.main
    with pytest.raises(SystemExit) as stop:
        entry(["--help"])
    out = capsys.readouterr().out
    assert stop.value.code == 0 and "usage:" in out and "(default: " in out
    assert "--precision {" not in out  # where there is a precision, --help names it --mixed-precision
    with pytest.raises(SystemExit) as stop:
        entry(["--bogus-flag"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "unknown flag --bogus-flag" in err and "usage:" not in err


@pytest.mark.parametrize("name", ["evaluate.py", "predict.py", "serve.py", "train.py", "sweep.py"])
def test_mixed_precision_is_accepted_by_every_script_with_a_precision(name):
    module = load_script(f"scripts/{name}")
    first = [] if name in ("train.py", "sweep.py") else ["m"]
    rest = ["-q", "Who?", "-c", "Ann."] if name == "predict.py" else []
    parse = module.parse_args if hasattr(module, "parse_args") else cli.config_parser(None).parse_args
    for flag in ("--mixed-precision", "--precision"):
        assert parse([*first, *rest, flag, "bf16"]).mixed_precision == "bf16"
        assert parse([*first, *rest, flag, "fp32"]).mixed_precision == "no"  # the name the logs use


class _Built(Exception):
    def __init__(self, parser: cli.ScriptParser) -> None:
        self.parser = parser


@pytest.mark.parametrize("name", SCRIPTS)
def test_no_script_has_a_yes_no_flag_that_takes_no_value(name, monkeypatch):
    def caught(self, args=None, namespace=None):
        raise _Built(self)

    monkeypatch.setattr(cli.ScriptParser, "parse_args", caught)
    module = load_script(f"scripts/{name}")
    with pytest.raises(_Built) as built:
        (getattr(module, "parse_args", None) or module.main)([])
    flags = [a for a in built.value.parser._actions if isinstance(a, cli.BoolFlag)]
    bare_only = [a.option_strings for a in built.value.parser._actions if a.nargs == 0 and a.dest != "help"]
    assert not bare_only, f"{name}: {bare_only} take no value (store_true): use add_flag"
    assert flags


# ------------------------------------------------------------------------------------------ under accelerate launch


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, None),
        ({"ACCELERATE_MIXED_PRECISION": "no"}, None),  # set by a user, not by the launcher
        ({"ACCELERATE_MIXED_PRECISION": "no", "ACCELERATE_DYNAMO_BACKEND": "NO"}, "simple"),
        (
            {"ACCELERATE_MIXED_PRECISION": "no", "ACCELERATE_DYNAMO_BACKEND": "NO", "TORCHELASTIC_RUN_ID": "x"},
            "torchrun",
        ),
    ],
)
def test_the_launcher_is_told_from_the_environment_it_sets(monkeypatch, env, expected):
    for name in ("ACCELERATE_MIXED_PRECISION", "ACCELERATE_DYNAMO_BACKEND", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert runtime.accelerate_launcher() == expected
    note = cli.launcher_note()
    if expected is None:
        assert note is None
    elif expected == "simple":
        assert "CalledProcessError" in note and "accelerate launch --quiet" in note
    else:  # --quiet does not silence torch's agent: not offered
        assert "ChildFailedError" in note and "--quiet" not in note


def _fail(env: dict[str, str]) -> tuple[int, str]:
    """A script whose main() raises a library error, run with `env` in place of any launcher's variables."""
    code = (
        "from bertqa.cli import run\ndef main():\n    raise ValueError(\"model folder 'x' does not exist\")\nrun(main)"
    )
    ours = ("ACCELERATE_", "TORCHELASTIC", "RANK")
    clean = {k: v for k, v in os.environ.items() if not k.startswith(ours)}
    result = subprocess.run([sys.executable, "-c", code], env={**clean, **env}, capture_output=True, text=True)
    return result.returncode, result.stderr


@pytest.mark.e2e
def test_an_error_under_the_launcher_says_once_what_its_traceback_is():
    launched = {"ACCELERATE_MIXED_PRECISION": "no", "ACCELERATE_DYNAMO_BACKEND": "NO"}
    code, err = _fail(launched)
    assert code == 2 and err.splitlines()[0] == "error: model folder 'x' does not exist"
    assert "accelerate launch --quiet leaves it out" in err.splitlines()[1]
    code, err = _fail({**launched, "RANK": "1"})  # another process: the main one says it
    assert code == 2 and err.strip() == "error: model folder 'x' does not exist"
    code, err = _fail({})  # not launched: one line
    assert code == 2 and err.strip() == "error: model folder 'x' does not exist"


@pytest.mark.e2e
def test_a_real_accelerate_launch_failure_is_followed_by_the_note_and_quiet_drops_the_traceback(tmp_path):
    accelerate = Path(sys.executable).parent / "accelerate"
    if not accelerate.exists():
        pytest.skip("accelerate's launcher is not installed beside this Python")
    launch = [
        str(accelerate),
        "launch",
        "--cpu",
        "--num_processes",
        "1",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
    ]
    missing = tmp_path / "runs" / "final_modle"
    (tmp_path / "runs" / "final_model").mkdir(parents=True)
    result = run_script("train.py", "--model", missing, "--output-dir", tmp_path / "r", launch=launch)
    lines = result.stderr.splitlines()
    error = next(i for i, line in enumerate(lines) if line.startswith("error: "))
    assert f"model folder '{missing}' does not exist; did you mean {tmp_path / 'runs' / 'final_model'}?" in lines[error]
    assert "accelerate launch --quiet leaves it out" in lines[error + 1]
    assert "CalledProcessError" in result.stderr
    quiet = run_script(
        "train.py", "--model", missing, "--output-dir", tmp_path / "r", launch=[*launch[:2], "--quiet", *launch[2:]]
    )
    assert quiet.returncode != 0 and "Traceback" not in quiet.stderr


# ------------------------------------------------------------------------------- a model path that is not a model


def _one_line_error(module, argv: list[str], monkeypatch, capsys) -> str:
    monkeypatch.setattr(module, "setup_logging", lambda: None)  # the test's own logging stays as it is
    with pytest.raises(SystemExit) as stop:
        cli.run(lambda: module.main(argv))
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    return err.strip()


@pytest.mark.parametrize(
    ("name", "extra"),
    [("evaluate.py", []), ("predict.py", ["-q", "Who?", "-c", "Ann."]), ("export.py", ["out"]), ("serve.py", [])],
)
def test_every_script_names_a_mistyped_model_folder_and_a_runs_folder(tmp_path, monkeypatch, capsys, name, extra):
    from bertqa.config import TrainConfig

    monkeypatch.chdir(tmp_path)
    run = tmp_path / "runs" / "quick"
    (run / "final_model").mkdir(parents=True)
    (run / "best_model").mkdir()
    TrainConfig(output_dir="runs/quick").save(run / "config.json")
    module = load_script(f"scripts/{name}")
    said = _one_line_error(module, ["runs/quick/final_modle", *extra], monkeypatch, capsys)
    assert said == "error: model folder 'runs/quick/final_modle' does not exist; did you mean runs/quick/final_model?"
    assert sorted(p.name for p in run.iterdir()) == ["best_model", "config.json", "final_model"]  # nothing made
    said = _one_line_error(module, ["runs/quick", *extra], monkeypatch, capsys)
    assert said == (
        "error: runs/quick is a training run's folder, not a model folder; pass the model it saved: "
        "runs/quick/final_model or runs/quick/best_model"
    )
    assert not (run / "eval").exists() and not (tmp_path / "out").exists()


def test_a_script_closes_its_process_group_on_every_way_out(tmp_path):
    import torch.distributed as dist

    def failing() -> int:
        raise ValueError("a clear error")

    for i, (main, code) in enumerate(((lambda: 0, 0), (failing, 2))):
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / str(i)}", rank=0, world_size=1)
        with pytest.raises(SystemExit) as exited:
            cli.run(main)
        assert exited.value.code == code and not dist.is_initialized()


def test_evaluation_results_go_to_eval_model_data_never_inside_the_model(tmp_path, monkeypatch, tiny_dir):
    default_out = load_script("scripts/evaluate.py").default_out
    model = tmp_path / "runs" / "quick" / "final_model"
    shutil.copytree(tiny_dir, model)
    monkeypatch.chdir(tmp_path)
    assert default_out(str(model), "dev-v1.1") == Path("eval/quick-final_model/dev-v1.1")
    assert default_out("runs/quick/final_model", "dev-v2.0[3:5]") == Path(
        "eval/quick-final_model/dev-v2.0_articles_3-5"
    )
    assert default_out("deepset/roberta-base-squad2", None, v2=True) == Path(
        "eval/deepset--roberta-base-squad2/dev-v2.0"
    )
    assert default_out("minilm-l6", "squad:validation") == Path("eval/minilm-l6/squad_validation")
    mine = tmp_path / "my data.jsonl.gz"
    mine.write_text("")
    assert default_out(str(model), str(mine)) == Path("eval/quick-final_model/my_data")
    monkeypatch.chdir(model)  # inside the model folder: beside it, not in it
    assert default_out(".", None) == model.parent / "eval" / "quick-final_model" / "dev-v1.1"
