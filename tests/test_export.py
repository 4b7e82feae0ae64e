"""Export to ONNX (fp32 and int8) and the backends that answer from it: parity with PyTorch on real windows, the
same answers through `Answerer`, `predict.py` and `evaluate.py`, and what is refused."""

from __future__ import annotations

import json

import numpy as np
import pytest
from huggingface_hub import ModelCard

from bertqa.deploy import export as export_module
from bertqa.deploy.backends import backend_name, is_exported
from bertqa.deploy.export import FP32_TOLERANCE, ExportCheckError, export_onnx
from bertqa.deploy.serving import Answerer
from bertqa.sources import load_examples
from tests.test_scripts import script

# End to end: scripts, processes and whole runs (seconds each); `make test-fast` leaves them out.
pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def exports(tiny_dir, tmp_path_factory):
    """The tiny model exported as fp32 and as int8, with the reports."""
    root = tmp_path_factory.mktemp("exports")
    fp32 = export_onnx(tiny_dir, root / "fp32", check_questions=16)
    int8 = export_onnx(tiny_dir, root / "int8", quantize="int8", check_questions=16)
    return {"fp32": (root / "fp32", fp32), "int8": (root / "int8", int8)}


@pytest.fixture(scope="module")
def questions():
    examples, _ = load_examples("dev-v1.1", max_examples=12, seed=3)
    return [{"id": ex.id, "question": ex.question, "context": ex.context} for ex in examples]


def test_fp32_export_matches_pytorch_and_is_a_complete_folder(exports, tiny_dir):
    folder, report = exports["fp32"]
    assert report.max_abs_diff <= FP32_TOLERANCE and report.same_answers == report.questions == 16
    assert report.windows >= 16 and "the export matches" in report.format()
    names = {p.name for p in folder.iterdir()}
    assert {"model.onnx", "config.json", "bertqa.json", "tokenizer.json"} <= names, names
    meta = json.loads((folder / "bertqa.json").read_text())
    assert meta["export"]["format"] == "onnx" and meta["export"]["quantize"] is None
    assert meta["export"]["check"]["max_abs_diff"] == report.max_abs_diff
    assert meta["max_seq_length"] == 384 and meta["v2"] is False  # the settings to answer with travel along
    assert is_exported(folder) and not is_exported(tiny_dir)
    assert not [p for p in folder.parent.iterdir() if ".tmp-" in p.name]  # the temporary folder is gone
    # Its card says what it was exported from and what the check measured
    card = ModelCard.load(folder / "README.md")
    assert card.data.library_name == "onnx" and "onnx" in card.data.tags and not card.data.eval_results
    assert f"logits differ by at most {report.max_abs_diff:.2g}" in card.text and str(tiny_dir) in card.text
    assert f"{report.same_answers} of {report.questions} answers are the same" in card.text
    assert f'MODEL = "{folder}"' in card.text  # the folder it became, not the one it was written in


def test_answerer_gives_the_same_answers_from_the_exported_folder(exports, tiny_dir, questions):
    torch_answers = Answerer(tiny_dir, precision="no")(questions, top_k=3)
    onnx = Answerer(exports["fp32"][0])
    assert onnx.backend == "onnx-fp32" and onnx.device.type == "cpu"
    onnx_answers = onnx(questions, top_k=3)
    for t, o, q in zip(torch_answers, onnx_answers, questions):
        assert o.id == q["id"] == t.id
        assert (o.answer, o.start, o.end) == (t.answer, t.start, t.end)
        assert o.probability == pytest.approx(t.probability, abs=1e-4)
        assert [c["answer"] for c in o.top_k] == [c["answer"] for c in t.top_k]
        assert q["context"][o.start : o.end] == o.answer


def test_int8_export_is_smaller_and_answers_from_the_context(exports, questions):
    folder, report = exports["int8"]
    assert report.quantize == "int8" and "int8 changes them by design" in report.format()
    fp32_size = (exports["fp32"][0] / "model.onnx").stat().st_size
    assert (folder / "model.onnx").stat().st_size < fp32_size
    answerer = Answerer(folder)
    assert answerer.backend == "onnx-int8" == backend_name(folder)
    for q, a in zip(questions, answerer(questions)):
        assert a.id == q["id"] and q["context"][a.start : a.end] == a.answer and 0 < a.probability <= 1


def test_int8_partial_keeps_each_ffn_output_in_fp32(tiny_dir, tmp_path, questions):
    import onnx

    report = export_onnx(tiny_dir, tmp_path / "p", quantize="int8-partial", check_questions=4)
    nodes = onnx.load(str(tmp_path / "p" / "model.onnx")).graph.node
    made_by = {out: n.op_type for n in nodes for out in n.output}
    float_matmuls = [n for n in nodes if n.op_type == "MatMul" and made_by.get(n.input[0]) in ("Gelu", "BiasGelu")]
    assert len(float_matmuls) == 2  # one per layer of the tiny model, left in fp32
    assert any(n.op_type in ("MatMulInteger", "DynamicQuantizeMatMul") for n in nodes)  # the rest quantized
    assert report.quantize == "int8-partial" and Answerer(tmp_path / "p").backend == "onnx-int8-partial"
    for q, a in zip(questions, Answerer(tmp_path / "p")(questions)):
        assert q["context"][a.start : a.end] == a.answer


def test_an_export_that_does_not_match_is_refused_and_writes_nothing(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(export_module, "FP32_TOLERANCE", -1.0)  # any difference at all is too much
    with pytest.raises(ExportCheckError, match="differ from PyTorch's"):
        export_onnx(tiny_dir, tmp_path / "out", check_questions=4)
    assert list(tmp_path.iterdir()) == []


def test_export_never_replaces_a_folder_unasked(tiny_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="pass --overwrite"):
        export_onnx(tiny_dir, out, check_questions=4)
    assert (out / "mine.txt").read_text() == "keep"
    with pytest.raises(ValueError, match="quantize must be one of"):
        export_onnx(tiny_dir, tmp_path / "x", quantize="int4")


def test_export_refuses_to_replace_its_own_source_or_a_file(tiny_dir, tmp_path, exports):
    import shutil

    model = tmp_path / "run" / "final_model"
    shutil.copytree(tiny_dir, model)
    for out in (model, model.parent):  # the model itself, or the run folder holding it: even with overwrite
        with pytest.raises(ValueError, match="is \\(or holds\\) the model being exported"):
            export_onnx(model, out, overwrite=True, check_questions=4)
    assert (model / "model.safetensors").is_file()
    (tmp_path / "afile").write_text("x")
    with pytest.raises(FileExistsError, match="is a file; the export writes a folder"):
        export_onnx(model, tmp_path / "afile", overwrite=True, check_questions=4)
    with pytest.raises(ValueError, match="already an exported model"):
        export_onnx(exports["fp32"][0], tmp_path / "again", check_questions=4)
    with pytest.raises(OSError, match="is a file, not a folder"):
        export_onnx(model, tmp_path / "afile" / "out", check_questions=4)


def test_sigterm_during_an_export_leaves_no_temporary_folder(tiny_dir, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    from tests.test_scripts import ENV, ROOT

    stale = tmp_path / ".m.tmp-999999999"  # left by an export killed earlier: cleared by the next one
    stale.mkdir()
    cmd = [sys.executable, str(ROOT / "scripts" / "export.py"), str(tiny_dir), str(tmp_path / "m")]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(f".m.tmp-{proc.pid}")) and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143 and "Traceback" not in err, err
    assert list(tmp_path.iterdir()) == [], list(tmp_path.iterdir())


def test_an_exported_model_runs_in_its_own_precision(exports):
    with pytest.raises(ValueError, match="precision it was exported in"):
        Answerer(exports["fp32"][0], precision="bf16")


def test_predict_and_evaluate_take_an_exported_folder(exports, tiny_dir, tmp_path):
    folder = exports["fp32"][0]
    line = json.loads(script("predict.py", folder, "-q", "Who wrote it?", "-c", "Ann Lee wrote it.").stdout)
    assert line["id"] == 0 and "Ann Lee wrote it."[line["start"] : line["end"]] == line["answer"]
    scores = {}
    for name, model in (("onnx", folder), ("torch", tiny_dir)):
        out = tmp_path / name
        script("evaluate.py", model, "--data", "dev-v1.1", "--max-examples", "20", "--precision", "no", "--out", out)
        scores[name] = json.loads((out / "scores.json").read_text())
        preds = json.loads((out / "predictions.json").read_text())
        scores[name]["predictions"] = preds
    assert scores["onnx"]["predictions"] == scores["torch"]["predictions"]
    assert np.isclose(scores["onnx"]["f1"], scores["torch"]["f1"]) and scores["onnx"]["total"] == 20


def test_export_script_says_what_it_checked(tiny_dir, tmp_path):
    result = script("export.py", tiny_dir, tmp_path / "m", "--check-questions", "4")
    # The exporter's chatter is hidden; what is said is bertqa's: the windows a folder without bertqa.json gets
    said = [line for line in result.stderr.splitlines() if "INFO" in line]
    assert "the export matches" in result.stdout and len(said) == 1 and "has no bertqa.json" in said[0], said
    again = script("export.py", tiny_dir, tmp_path / "m", "--check-questions", "4", check=False)
    assert again.returncode != 0 and "already exists; pass --overwrite" in again.stderr
    assert "Traceback" not in again.stderr
