"""Distillation and smaller students: the soft loss, the teacher's isolation, refused teachers, a changed teacher
on resume, and students built from some of a pretrained model's layers."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch

from bertqa import batching, engine
from bertqa.config import TrainConfig
from bertqa.distill import Distillation, check_same_vocabulary, load_teacher, soft_span_loss
from bertqa.model import build_model, build_tokenizer, pick_layers
from tests.conftest import make_tiny, tiny_config
from tests.test_engine import small_features  # noqa: F401 (a fixture)


def batch_of(features, tokenizer, multiple=8):
    rows = batching.FeatureDataset(features)
    return batching.Collator(tokenizer.pad_token_id, pad_to_multiple_of=multiple)([rows[i] for i in range(4)])


def test_soft_loss_is_zero_for_the_teachers_own_logits_and_blind_to_padding(small_features, tokenizer):  # noqa: F811
    student, teacher = make_tiny(seed=0), make_tiny(seed=1)
    short, long = batch_of(small_features, tokenizer), batch_of(small_features, tokenizer, multiple=128)
    losses = []
    for batch in (short, long):
        ours, theirs = student(**engine.model_inputs(batch)), teacher(**engine.model_inputs(batch))
        pair = (ours.start_logits, ours.end_logits), (theirs.start_logits, theirs.end_logits)
        losses.append(soft_span_loss(*pair, batch["attention_mask"], temperature=2.0).item())
        assert soft_span_loss(pair[0], pair[0], batch["attention_mask"], temperature=2.0).item() == pytest.approx(
            0, abs=1e-6
        )
    assert losses[0] > 0 and losses[0] == pytest.approx(losses[1], rel=1e-5)  # padded further: the same loss


def test_the_distilled_loss_mixes_gold_and_soft_and_never_trains_the_teacher(small_features, tokenizer):  # noqa: F811
    student, teacher = make_tiny(seed=0), make_tiny(seed=1).eval().requires_grad_(False)
    batch = batch_of(small_features, tokenizer)
    assert torch.equal(Distillation(teacher, alpha=0.0)(student, batch), engine.default_loss(student, batch))
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    loss = Distillation(teacher, alpha=0.7, temperature=3.0)(student, batch)
    gold = engine.default_loss(student, batch)
    out, theirs = student(**engine.model_inputs(batch)), teacher(**engine.model_inputs(batch))
    soft = soft_span_loss(
        (out.start_logits, out.end_logits),
        (theirs.start_logits, theirs.end_logits),
        batch["attention_mask"],
        temperature=3.0,
    )
    assert loss.item() == pytest.approx((0.3 * gold + 0.7 * soft).item(), rel=1e-5)
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    with pytest.raises(ValueError, match="distill_alpha must be in"):
        Distillation(teacher, alpha=1.5)


def swapped_vocabulary_folder(tmp_path, tiny_dir):
    """The tiny model with a tokenizer that gives "the" and "of" each other's ids: same size, other meaning."""
    folder = tmp_path / "other-teacher"
    shutil.copytree(tiny_dir, folder)
    spec = json.loads((folder / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    vocab["the"], vocab["of"] = vocab["of"], vocab["the"]
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    return folder


def test_a_teacher_with_another_vocabulary_is_refused_by_name(tmp_path, tokenizer, tiny_dir):
    folder = swapped_vocabulary_folder(tmp_path, tiny_dir)
    with pytest.raises(
        ValueError,
        match=r"teacher .*other-teacher: its tokenizer's vocabulary \(30,522 tokens\) "
        r"differs from the student's \(30,522 tokens\); e.g. '(the|of)'",
    ):
        load_teacher(folder, student_tokenizer=tokenizer)
    check_same_vocabulary(tokenizer, build_tokenizer("minilm-l6"), teacher="same")  # the same one passes


def test_config_refuses_bad_distillation_settings():
    for changes, message in (
        ({"distill_alpha": 1.5}, "distill_alpha"),
        ({"distill_temperature": 0.0}, "temperature"),
        ({"num_layers": 0}, "num_layers must be at least 1"),
    ):
        with pytest.raises(ValueError, match=message):
            TrainConfig(**changes)


def test_fit_distils_a_one_layer_student_from_a_saved_teacher(tmp_path, tiny_dir):
    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_dir, teacher)
    base = tiny_config(tmp_path, model=str(tiny_dir), num_layers=1, max_steps=3, save_model=True)
    plain = engine.fit(base.replace(output_dir=str(tmp_path / "plain")))
    config = base.replace(teacher=str(teacher), distill_alpha=0.9, distill_temperature=2.0)
    distilled = engine.fit(config)
    assert distilled["steps"] == plain["steps"] == 3
    saved = json.loads((tmp_path / "run" / "final_model" / "config.json").read_text())
    assert saved["num_hidden_layers"] == 1
    logs = [
        [json.loads(x) for x in (tmp_path / run / "train_log.jsonl").read_text().splitlines()]
        for run in ("plain", "run")
    ]
    assert logs[0][1]["step"] == 1 and logs[0][1]["loss"] != pytest.approx(logs[1][1]["loss"])  # the teacher counts
    with pytest.raises(ValueError, match="teacher or your own compute_loss, not both"):
        engine.fit(config.replace(output_dir=str(tmp_path / "x")), compute_loss=lambda m, b: engine.default_loss(m, b))

    make_tiny(seed=5).save_pretrained(teacher)  # the teacher retrained in the same folder
    with pytest.raises(ValueError, match=r"change the computation .*_teacher_weights: '\w+' -> '\w+'"):
        engine.fit(config.replace(max_steps=4, resume="latest", accept_changes=False))


def test_a_student_keeps_the_pretrained_layers_it_picks(tmp_path):
    full = build_model("minilm-l6")
    student = build_model("minilm-l6", num_layers=3, layer_pick="every-kth")
    assert pick_layers(6, 3, "every-kth") == [0, 2, 4] and pick_layers(6, 4, "first") == [0, 1, 2, 3]
    assert student.config.num_hidden_layers == 3 and len(student.bert.encoder.layer) == 3
    for mine, theirs in zip(student.bert.encoder.layer, [full.bert.encoder.layer[i] for i in (0, 2, 4)]):
        assert all(torch.equal(a, b) for a, b in zip(mine.state_dict().values(), theirs.state_dict().values()))
    student.save_pretrained(tmp_path / "student")
    reloaded = build_model(tmp_path / "student")
    assert reloaded.config.num_hidden_layers == 3
    kept = reloaded.bert.encoder.layer[1].output.dense.weight
    assert torch.equal(kept, full.bert.encoder.layer[2].output.dense.weight)
    with pytest.raises(ValueError, match="num_layers=7: minilm-l6 has 6 encoder layers; choose 1 to 6"):
        build_model("minilm-l6", num_layers=7)


@pytest.mark.e2e
def test_bad_research_settings_are_one_line_errors_before_any_training(tmp_path, tiny_dir):
    from tests.test_scripts import SMALL, script

    other = swapped_vocabulary_folder(tmp_path, tiny_dir)
    cases = [
        (["--teacher", other], "its tokenizer's vocabulary (30,522 tokens) differs"),
        (["--num-layers", "9"], "num_layers=9:"),
        (["--layer-lr-decay", "1.5"], "layer_lr_decay must be in (0, 1]"),
        (["--early-stopping-patience", "2"], "early_stopping_patience=2 can never end this run"),
    ]
    for i, (flags, message) in enumerate(cases):
        out = tmp_path / f"run{i}"
        result = script("train.py", *SMALL, "--model", tiny_dir, *flags, "--output-dir", out, check=False)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and lines[-1].startswith("error: ") and message in lines[-1], result.stderr
        assert not (out / "checkpoints").exists() and "Traceback" not in result.stderr


def test_teachers_that_cannot_teach_are_refused_by_name_and_overwrite_clears_nothing_first(tmp_path, tiny_dir, tiny):
    from bertqa.distill import check_teacher
    from bertqa.model import build_tokenizer

    student = build_tokenizer(tiny_dir)
    encoder = tmp_path / "encoder"  # a plain encoder: its QA head would be random
    shutil.copytree(tiny_dir, encoder)
    spec = json.loads((encoder / "config.json").read_text())
    (encoder / "config.json").write_text(json.dumps({**spec, "architectures": ["BertModel"]}))
    short = tmp_path / "short"  # reads at most 64 positions, the student's windows are 128
    make_tiny(max_position_embeddings=64).save_pretrained(short)
    student.save_pretrained(short)
    run = tmp_path / "earlier"  # a run folder, whose model is in final_model/
    shutil.copytree(tiny_dir, run / "final_model")
    from bertqa.data import Window

    for folder, message in (
        (encoder, "is not a question-answering model (its config names ['BertModel'])"),
        (short, "max_seq_length=128 is longer than"),
        (tmp_path / "nowhere", "does not exist"),
        (run, "no model there (no config.json); did you mean"),
    ):
        with pytest.raises(ValueError, match=rf"teacher .*{folder.name}.*{re.escape(message)}"):
            check_teacher(folder, student_tokenizer=student, window=Window(128, 32, 32))
    config = tiny_config(tmp_path, model=str(tiny_dir), max_steps=2, save_model=True)
    engine.fit(config, model=tiny())  # a finished run in tmp_path/run
    with pytest.raises(ValueError, match="is not a question-answering model"):
        engine.fit(config.replace(overwrite=True, teacher=str(encoder)))
    assert (tmp_path / "run" / "final_model" / "config.json").is_file()  # refused before anything was removed
    with pytest.raises(ValueError, match=r"lies in output_dir .* which --overwrite would clear"):
        engine.fit(config.replace(overwrite=True, teacher=str(tmp_path / "run" / "final_model")))
