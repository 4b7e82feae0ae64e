"""The measuring tools in benchmarks/ run and check their flags (tiny model; they measure nothing here)."""

from __future__ import annotations

import json
import re

import pytest

from tests.test_scripts import SMALL, script

# End to end: scripts, processes and whole runs (seconds each); `make test-fast` leaves them out.
pytestmark = pytest.mark.e2e


def test_benchmark_runs_both_loops(tmp_path, tiny_dir):
    out = tmp_path / "bench.json"
    args = ["--model", tiny_dir, "--windows", "48", "--batch-size", "8", "--eval-examples", "16", "--json", out]
    result = script("benchmarks/benchmark.py", *args)
    report = json.loads(out.read_text())
    bertqa, trainer, tuned = report["results"]
    assert bertqa["loop"] == "bertqa" and trainer["loop"].startswith("Trainer") and tuned["loop"] == "Trainer (tuned)"
    assert trainer["padding_efficiency"] < tuned["padding_efficiency"] <= 1.0
    assert trainer["padding_efficiency"] < bertqa["padding_efficiency"] <= 1.0
    assert bertqa["timed_windows"] == trainer["timed_windows"] == tuned["timed_windows"] == 48  # the second pass
    assert report["ratio_examples_per_s"] > 0 and report["ratio_tuned_examples_per_s"] > 0
    assert report["postprocess_v2_dev_s"] > 0
    assert "ratio bertqa / Trainer (tuned)" in result.stdout


def test_profile_times_every_phase(tiny_dir):
    args = ["--model", tiny_dir, "--windows", "16", "--batch-size", "4", "--steps", "2"]
    out = script("benchmarks/profile_loop.py", *args).stdout
    phase = r"^  (data|forward \+ loss|backward|clip \+ optimizer|sum of phases) +([0-9.]+) ms"
    times = dict(re.findall(phase, out, re.M))
    assert len(times) == 5 and all(float(v) >= 0 for v in times.values())
    assert float(times["forward + loss"]) > 0 and float(times["backward"]) > 0
    assert "loop as it runs" in out and "Self CPU" in out  # the profiler's operator table


@pytest.mark.parametrize(
    ("name", "args", "message"),
    [
        ("benchmarks/benchmark.py", ["--batch-size", "0"], "--batch-size: must be at least 1"),
        ("benchmarks/benchmark.py", ["--windows", "-3"], "--windows: must be at least 1"),
        ("benchmarks/benchmark.py", ["--eval-examples", "0"], "--eval-examples: must be at least 1"),
        ("benchmarks/benchmark.py", ["--attention-dropout", "1"], "--attention-dropout: must be in [0, 1)"),
        ("benchmarks/benchmark.py", ["--peak-tflops", "-5"], "--peak-tflops: must be above 0"),
        ("benchmarks/benchmark.py", ["--json", "{file}/x.json"], "a-file is a file, not a folder"),
        ("benchmarks/profile_loop.py", ["--steps", "0"], "--steps: must be at least 1"),
        ("benchmarks/profile_loop.py", ["--windows", "2", "--batch-size", "8"], "--windows (2) is smaller than"),
        ("benchmarks/profile_loop.py", ["--attention-dropout", "abc"], "--attention-dropout: expected a number"),
    ],
)
def test_measuring_scripts_refuse_bad_flags_before_any_work(tmp_path, name, args, message):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    result = script(name, *(a.format(file=blocker) for a in args), check=False)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


def test_trainer_baseline_trains_on_the_same_windows(tmp_path, tiny_dir):
    out = tmp_path / "baseline.json"
    args = [*SMALL, "--epochs", "2", "--log-every", "1", "--output-dir", tmp_path / "tb", "--json", out]
    result = script("benchmarks/trainer_baseline.py", "--model", tiny_dir, *args)
    report = json.loads(out.read_text())
    assert json.loads(result.stdout.strip().splitlines()[-1])["f1"] == report["f1"]
    # 48 dev-v1.1 examples at 128 tokens: the same windows as bertqa cuts (see the label check of train.py)
    bertqa = script("train.py", "--model", tiny_dir, *SMALL, "--epochs", "1", "--output-dir", tmp_path / "b")
    windows = int(re.search(r"48 train examples -> (\d+) windows", bertqa.stdout + bertqa.stderr)[1])
    assert report["train_windows"] == windows and report["steps"] == 2 * -(-windows // 4)
    assert report["eval_windows"] >= 24 and 0 <= report["f1"] <= 100
    assert report["last_logged_loss"] < report["first_logged_loss"]  # lr 1e-3 on a tiny model: it does move
    assert report["train_time_s"] > 0 and report["config"]["batch_size"] == 4


def test_v2_thresholds_scores_a_run_at_each_kind_of_threshold(tmp_path, tiny_dir):
    run = tmp_path / "run"
    args = ["--model", tiny_dir, *SMALL, "--negatives", "1", "--max-steps", "2", "--label-check-min", "0.9"]
    script("train.py", *args, "--output-dir", run)
    out = script("benchmarks/v2_thresholds.py", run).stdout
    table = json.loads((run / "v2_thresholds.json").read_text())
    assert [row["threshold chosen on"].split(" (")[0] for row in table["rows"]] == [
        "held-out training questions, negatives included",
        "held-out training questions without the negatives",
        "0",
        "the evaluation data's own best",
    ]
    best = table["rows"][-1]["F1"]
    assert all(row["F1"] <= best for row in table["rows"])  # the evaluation data's own best is an upper bound
    assert best >= round(table["all_null_f1"], 2) and '"no answer" to everything' in out


def test_student_speed_times_each_model_on_the_same_windows(tmp_path, tiny_dir, tokenizer):
    from bertqa.model import build_model

    student = build_model(tiny_dir, num_layers=1)
    student.save_pretrained(tmp_path / "student")
    tokenizer.save_pretrained(tmp_path / "student")
    args = [tiny_dir, tmp_path / "student", "--max-eval-examples", "16", "--repeats", "2", "--precision", "no"]
    rows = [json.loads(line) for line in script("benchmarks/student_speed.py", *args).stdout.splitlines()]
    assert [r["layers"] for r in rows] == [2, 1] and rows[0]["windows"] == rows[1]["windows"] >= 16
    assert rows[0]["speedup_over_first"] == 1.0 and rows[1]["parameters"] < rows[0]["parameters"]
    assert all(r["windows_per_s"] > 0 for r in rows)


def _budget_run(folder, *, precision, budget_s, f1, updates=100):
    folder.mkdir(parents=True)
    plan = {"budget_s": budget_s, "precision": precision, "questions": 3000}
    (folder / "config.json").write_text(json.dumps({"_budget_plan": plan}))
    (folder / "metrics.jsonl").write_text(json.dumps({"step": updates, "exact": f1 - 10, "f1": f1}) + "\n")


def test_budget_curve_tables_and_plots_runs_by_precision_and_budget(tmp_path):
    for seed, f1 in ((1, 60.0), (2, 64.0)):
        _budget_run(tmp_path / f"fp32-8m-{seed}", precision="fp32", budget_s=480, f1=f1)
    with (tmp_path / "fp32-8m-2" / "metrics.jsonl").open("a") as f:  # a run stopped by its deadline says why last
        f.write(json.dumps({"step": 100, "stopped": "time budget: ..."}) + "\n")
    _budget_run(tmp_path / "bf16-4m", precision="bf16", budget_s=240, f1=55.5)
    runs = sorted(str(p) for p in tmp_path.iterdir())
    out = script("benchmarks/budget_curve.py", *runs, "--plot", tmp_path / "curve.png").stdout
    assert "| fp32 | 8 min | 2 | 62.00 | 4.00 |" in out and "| bf16 | 4 min | 1 | 55.50 | 0.00 |" in out
    assert f"| fp32 | 8 min | 100 | 3,000 | 50.00 | 60.00 | {tmp_path / 'fp32-8m-1'} |" in out
    assert (tmp_path / "curve.png").stat().st_size > 0

    (tmp_path / "fixed").mkdir()
    (tmp_path / "fixed" / "config.json").write_text("{}")
    (tmp_path / "fixed" / "metrics.jsonl").write_text("")
    refused = script("benchmarks/budget_curve.py", tmp_path / "fixed", check=False)
    assert refused.returncode != 0 and "not a time-budget run (its config.json holds no _budget_plan)" in refused.stderr


def test_the_memory_benchmark_measures_every_setup_against_full_fine_tuning(tmp_path, tiny_dir):
    out = tmp_path / "memory.json"
    args = ["--model", tiny_dir, "--max-seq-length", "32", "--batch-size", "2", "--steps", "1", "--lora-r", "2"]
    result = script("benchmarks/memory.py", *args, "--precision", "no", "--json", out)
    rows = {r["setup"]: r for r in json.loads(out.read_text())["results"]}
    assert list(rows) == ["full", "ckpt", "lora", "lora+ckpt"] and "ratios to full" in result.stdout
    assert all(r["peak_mib"] >= r["before_training_mib"] > 0 and r["s_per_update"] > 0 for r in rows.values())
    assert rows["ckpt"]["trainable"] == rows["full"]["trainable"] == rows["full"]["parameters"]
    assert rows["lora"]["trainable"] < rows["full"]["trainable"] / 5
    assert rows["lora"]["optimizer_state_mib"] < rows["full"]["optimizer_state_mib"] / 5
