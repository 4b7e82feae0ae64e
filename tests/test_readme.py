"""The README's library example runs as written (real MiniLM, a few dozen real examples)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from bertqa.config import PRESETS

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_example() -> str:
    text = README.read_text()
    match = re.search(r"<!-- this block is run by tests/test_readme.py -->\n```python\n(.*?)```", text, re.S)
    assert match, "README lost its tested example"
    return match.group(1)


@pytest.mark.e2e
def test_readme_example_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    exec(compile(readme_example(), "README.md", "exec"), {"__name__": "readme"})
    out = capsys.readouterr().out
    match = re.search(r"F1 (\d+\.\d) after (\d+) updates, peak LR (\S+), stopped early: (.+)", out)
    assert match, out
    # 3 updates (max_steps replaces the preset's time budget); with 0 warmup updates the LR after the first is 2/3 of
    # the preset's peak (printed to 2 significant digits).
    peak = PRESETS["quick"]["lr"]
    assert int(match.group(2)) == 3 and float(match.group(3)) == pytest.approx(peak * 2 / 3, rel=0.05)
    assert match.group(4) == "None"  # 64 questions do not take MiniLM past F1 90
    assert (tmp_path / "runs" / "readme-example" / "final_model" / "model.safetensors").exists()


def shell_commands(block: str) -> list[list[str]]:
    """The commands of a README bash block: continuation lines joined, comments dropped, `python` this Python,
    `scripts/...` the checkout's scripts."""
    import shlex
    import sys

    lines = block.replace("\\\n", " ").splitlines()
    commands = [shlex.split(line, comments=True) for line in lines if line.strip()]
    root = README.parent
    return [[sys.executable if w == "python" else str(root / w) if w.startswith("scripts/") else w for w in command]
            for command in commands]  # fmt: skip


@pytest.mark.slow
def test_the_readme_data_examples_run_as_written(tmp_path):
    import json
    import os
    import shutil
    import subprocess

    text = README.read_text()
    files = {kind: re.search(rf"```{kind}\n(.*?)```", text, re.S).group(1) for kind in ("jsonl", "csv")}
    given = {"mine.jsonl": files["jsonl"], "dev.jsonl": files["jsonl"], "mine.csv": files["csv"],
             "test.csv": files["csv"]}  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    for kind in ("jsonl", "csv"):
        block = re.search(rf"```{kind}\n.*?```\n\n[^`]*?```bash\n(.*?)```", text, re.S).group(1)
        runs = shell_commands(block)
        # The JSONL block's commands are alternatives (each a run of its own); the CSV block's evaluate the model
        # its first one trained.
        groups = [[run] for run in runs] if kind == "jsonl" else [runs]
        assert runs and all(any(w.endswith(".py") for w in run) for run in runs)
        for k, group in enumerate(groups):
            cwd = tmp_path / f"{kind}-{k}"
            cwd.mkdir()
            for name, content in given.items():
                (cwd / name).write_text(content)
            for run in group:
                result = subprocess.run(run, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
                assert result.returncode == 0, f"{run}\n{result.stderr[-3000:]}"
                scores = next(line for line in result.stdout.splitlines() if line.startswith("{"))
                assert "f1" in json.loads(scores), result.stdout
            shutil.rmtree(cwd)  # three models and their checkpoints are 2 GB
