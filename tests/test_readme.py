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
