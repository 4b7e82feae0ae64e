"""The documentation's examples run as written (real MiniLM, a few dozen real examples), its Python blocks parse, and
its links lead somewhere.

The tested library example lives in docs/RESEARCH.md, the data examples (a JSONL and a CSV file, and the commands that
train and evaluate on them) in docs/TRAINING.md."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from bertqa.config import PRESETS

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
RESEARCH = ROOT / "docs" / "RESEARCH.md"
TRAINING = ROOT / "docs" / "TRAINING.md"
DOCS = [README, *sorted((ROOT / "docs").glob("*.md"))]


def research_example() -> str:
    text = RESEARCH.read_text()
    match = re.search(r"<!-- this block is run by tests/test_readme.py -->\n```python\n(.*?)```", text, re.S)
    assert match, "docs/RESEARCH.md lost its tested example"
    return match.group(1)


@pytest.mark.e2e
def test_the_research_example_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    exec(compile(research_example(), str(RESEARCH), "exec"), {"__name__": "readme"})
    out = capsys.readouterr().out
    match = re.search(r"F1 (\d+\.\d) after (\d+) updates, peak LR (\S+), stopped early: (.+)", out)
    assert match, out
    # 3 updates (max_steps replaces the preset's time budget); with 0 warmup updates the LR after the first is 2/3 of
    # the preset's peak (printed to 2 significant digits).
    peak = PRESETS["quick"]["lr"]
    assert int(match.group(2)) == 3 and float(match.group(3)) == pytest.approx(peak * 2 / 3, rel=0.05)
    assert match.group(4) == "None"  # 64 questions do not take MiniLM past F1 90
    assert (tmp_path / "runs" / "readme-example" / "final_model" / "model.safetensors").exists()


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", path.read_text(), re.S | re.M)


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_the_python_blocks_parse(path):
    """Blocks that cannot run here (a config elided as `TrainConfig(...)`, a hub dataset) must at least be Python."""
    for block in python_blocks(path):
        compile(block, str(path), "exec")


def test_the_readme_hook_example_is_the_research_guides():
    """The README shows the hook example of docs/RESEARCH.md; the two copies say the same."""
    hook = [block for block in python_blocks(README) if "class LossWatch(Hook)" in block]
    assert len(hook) == 1, "README lost its hook example"
    assert hook[0] in python_blocks(RESEARCH)


def heading_anchors(path: Path) -> set[str]:
    """The anchors GitHub gives the file's headings: lower case, punctuation dropped, spaces to hyphens, repeats
    numbered."""
    anchors: set[str] = set()
    fenced = False
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced and (match := re.match(r"#{1,6} (.+)", line)):
            text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", match.group(1)).replace("`", "")
            slug = re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")
            anchor, n = slug, 0
            while anchor in anchors:
                n += 1
                anchor = f"{slug}-{n}"
            anchors.add(anchor)
    return anchors


def local_links(path: Path) -> list[str]:
    text = re.sub(r"^\s*```.*?^\s*```", "", path.read_text(), flags=re.S | re.M)  # not in code blocks
    targets = re.findall(r"\]\(([^)\s]+)\)", text)
    return [t for t in targets if not re.match(r"[a-z]+:", t)]


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_the_links_resolve(path):
    """Every link to a file of the repository finds it, and every #anchor a heading of the file it points into."""
    for link in local_links(path):
        target, _, anchor = link.partition("#")
        file = (path.parent / target).resolve() if target else path
        assert file.exists(), f"{path.name}: {link} leads nowhere"
        if anchor:
            assert file.suffix == ".md" and anchor in heading_anchors(file), f"{path.name}: no heading for {link}"


def shell_commands(block: str) -> list[list[str]]:
    """The commands of a bash block: continuation lines joined, comments dropped, `python` this Python,
    `scripts/...` the checkout's scripts."""
    import shlex
    import sys

    lines = block.replace("\\\n", " ").splitlines()
    commands = [shlex.split(line, comments=True) for line in lines if line.strip()]
    return [
        [sys.executable if w == "python" else str(ROOT / w) if w.startswith("scripts/") else w for w in command]
        for command in commands
    ]


@pytest.mark.slow
def test_the_training_guide_data_examples_run_as_written(tmp_path):
    import json
    import os
    import shutil
    import subprocess

    text = TRAINING.read_text()
    files = {kind: re.search(rf"```{kind}\n(.*?)```", text, re.S).group(1) for kind in ("jsonl", "csv")}
    given = {
        "mine.jsonl": files["jsonl"],
        "dev.jsonl": files["jsonl"],
        "mine.csv": files["csv"],
        "test.csv": files["csv"],
    }
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
