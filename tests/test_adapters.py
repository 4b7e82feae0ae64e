"""LoRA adapters (bertqa.adapters) and gradient checkpointing: what trains, what is saved and loaded, the
combinations with other settings (each right or refused by name), and the same losses with checkpointing."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from huggingface_hub import ModelCard
from transformers import AutoModelForQuestionAnswering

from bertqa import adapters, engine
from bertqa.config import TrainConfig, computation_changes, kept_on_resume
from bertqa.training import optim
from bertqa.training.checkpoint import latest_checkpoint
from tests.conftest import make_tiny, tiny_config

QUESTIONS = [
    {"question": "Who wrote the book?", "context": "The book was written by Ann Lee in 1990 in Paris."},
    {"question": "When was it written?", "context": "The book was written by Ann Lee in 1990 in Paris."},
]


def lora_run(tmp_path, model_dir, **changes):
    """A LoRA run of the tiny model saved in `model_dir` (fit builds it, so the adapter names it as its base)."""
    settings = dict(model=str(model_dir), lora_r=4, lr=1e-2, save_model=True, **changes)
    return engine.fit(tiny_config(tmp_path, **settings))


def logits(model, tokenizer):
    batch = tokenizer(["who wrote it?"], ["it was written by ann lee."], return_tensors="pt")
    with torch.no_grad():
        out = model.eval()(**batch)
    return torch.cat([out.start_logits, out.end_logits])


def test_the_family_default_targets_are_the_attention_projections_and_bad_names_are_refused(tiny_model):
    assert adapters.lora_targets(tiny_model) == ("query", "key", "value")
    assert adapters.lora_targets(tiny_model, ["query", "dense"]) == ("query", "dense")
    with pytest.raises(ValueError, match=r"lora_targets q_proj: BertForQuestionAnswering has no linear layer.*query"):
        adapters.lora_targets(tiny_model, ["q_proj"])
    with pytest.raises(ValueError, match="qa_outputs is the QA head"):
        adapters.lora_targets(tiny_model, ["qa_outputs"])


def test_lora_trains_adapters_and_the_head_only(tiny_model):
    model = adapters.add_lora(tiny_model, r=4, alpha=None, dropout=0.0, targets=())
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n or "qa_outputs.modules_to_save" in n for n in trained)
    assert any("qa_outputs" in n for n in trained)
    trainable, total = adapters.describe_trainable(model)
    assert trainable == sum(p.numel() for n, p in model.named_parameters() if n in trained)
    assert total == sum(p.numel() for p in make_tiny().parameters()) + sum(
        p.numel() for n, p in model.named_parameters() if "lora_" in n
    )
    # alpha unset is 2r: the adapters' scale is 2
    scales = [m.scaling["default"] for m in model.modules() if isinstance(getattr(m, "scaling", None), dict)]
    assert len(scales) == 6 and set(scales) == {2.0}


def test_a_lora_run_says_what_trains_and_saves_merged_models_with_the_adapter(tmp_path, tiny_dir, tokenizer, caplog):
    caplog.set_level("INFO", logger="bertqa")
    summary = lora_run(tmp_path, tiny_dir)
    assert (
        "LoRA r=4 (alpha 8, dropout 0.1) on query, key, value, the QA head trained in full; trainable:" in caplog.text
    )
    final = tmp_path / "run" / "final_model"
    # A plain transformers folder: no peft needed to read it, and it is not the base any more
    plain = AutoModelForQuestionAnswering.from_pretrained(final)
    base = AutoModelForQuestionAnswering.from_pretrained(tiny_dir)
    names = dict(plain.named_parameters())
    for name, p in base.named_parameters():
        layer, kind = name.split(".")[-2:]
        adapted = layer == "qa_outputs" or (layer in ("query", "key", "value") and kind == "weight")
        assert (not torch.equal(p, names[name])) == adapted, name
    # The adapter alone: peft's files, the tokenizer and settings, naming its base; small beside the model
    adapter = final / adapters.ADAPTER_DIR
    assert {"adapter_config.json", "adapter_model.safetensors", "bertqa.json", "tokenizer.json"} <= {
        p.name for p in adapter.iterdir()
    }
    assert json.loads((adapter / "bertqa.json").read_text())["base_model"] == str(tiny_dir)
    # Its card is bertqa's (peft writes a README.md of its own first), for peft to load it on its base
    card = ModelCard.load(adapter / "README.md")
    assert card.data.library_name == "peft" and "lora" in card.data.tags and "PeftModel.from_pretrained" in card.text
    assert f'MODEL = "{adapter}"' in card.text and "merged in" in card.text
    assert "Trained with LoRA (r=4): the adapters are merged into these weights" in (final / "README.md").read_text()
    assert (adapter / "adapter_model.safetensors").stat().st_size < (final / "model.safetensors").stat().st_size / 2
    # The adapter on its base answers as the merged model does
    assert torch.allclose(logits(adapters.load_trained(adapter), tokenizer), logits(plain, tokenizer), atol=1e-5)
    assert summary["final"]["f1"] >= 0


def test_the_adapter_folder_answers_through_answerer_and_predict_like_the_merged_model(tmp_path, tiny_dir):
    from bertqa.deploy.serving import Answerer
    from tests.test_scripts import script

    lora_run(tmp_path, tiny_dir)
    final = tmp_path / "run" / "final_model"
    merged = [a.to_dict() for a in Answerer(final, precision="no")(QUESTIONS)]
    on_base = [a.to_dict() for a in Answerer(final / "adapter", precision="no")(QUESTIONS)]
    for a, b in zip(merged, on_base):
        assert a["answer"] == b["answer"] and a["start"] == b["start"]
        assert a["score"] == pytest.approx(b["score"], abs=1e-4)
    out = script("predict.py", final / "adapter", "--base-model", tiny_dir, "-q", "Who?", "-c", "Ann Lee wrote it.")
    assert (
        json.loads(out.stdout)["answer"]
        == Answerer(final, precision="no")([{"question": "Who?", "context": "Ann Lee wrote it."}])[0].answer
    )
    with pytest.raises(ValueError, match="is a whole model, not a LoRA adapter"):
        adapters.load_trained(final, base_model=str(tiny_dir))
    args = ["--data", "dev-v1.1", "--max-examples", "8", "--precision", "no"]
    script("evaluate.py", final / "adapter", *args, "--base-model", tiny_dir, "--out", tmp_path / "eval-adapter")
    script("evaluate.py", final, *args, "--out", tmp_path / "eval-merged")
    scores = [json.loads((tmp_path / f"eval-{k}/scores.json").read_text()) for k in ("adapter", "merged")]
    assert scores[0]["f1"] == pytest.approx(scores[1]["f1"])


def test_an_adapter_of_a_model_built_from_a_config_needs_its_base_named(tmp_path, tiny_dir, tokenizer):
    engine.fit(tiny_config(tmp_path, lora_r=4, save_model=True), model=make_tiny())
    adapter = tmp_path / "run" / "final_model" / "adapter"
    with pytest.raises(ValueError, match="does not name its base model: pass its base model too"):
        adapters.load_trained(adapter)
    # make_tiny() is the model tiny_dir holds: on it, the adapter gives the merged model's answers
    merged = AutoModelForQuestionAnswering.from_pretrained(tmp_path / "run" / "final_model")
    on_base = adapters.load_trained(adapter, base_model=str(tiny_dir))
    assert torch.allclose(logits(on_base, tokenizer), logits(merged, tokenizer), atol=1e-5)


def test_a_resumed_lora_run_continues_exactly(tmp_path, tiny_dir):
    kwargs = dict(epochs=2.0, batch_size=4, save_every_steps=3, keep_checkpoints=5, lora_dropout=0.1)
    lora_run(tmp_path / "a", tiny_dir, **kwargs)

    class Crash(Exception):
        pass

    def crash(update):
        if update.step == 5:
            raise Crash

    config = tiny_config(tmp_path / "b", model=str(tiny_dir), lora_r=4, lr=1e-2, save_model=True, **kwargs)
    with pytest.raises(Crash):
        engine.fit(config, callbacks=[crash])
    assert latest_checkpoint(tmp_path / "b" / "run").name == "step_00000003"
    engine.fit(config.replace(resume="latest"))
    logs = [(tmp_path / d / "run/train_log.jsonl").read_text().splitlines() for d in ("a", "b")]
    losses = [[r["loss"] for r in map(json.loads, log) if "loss" in r] for log in logs]
    assert losses[0] == losses[1] and len(losses[0]) > 5
    a, b = (dict(adapters_of(tmp_path / d / "run/final_model")) for d in ("a", "b"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def adapters_of(folder):
    from safetensors.torch import load_file

    return load_file(folder / "adapter" / "adapter_model.safetensors").items()


def test_a_rank_that_changes_on_resume_is_refused_even_when_changes_are_accepted():
    old = TrainConfig(lora_r=8).to_dict()
    for new in (TrainConfig(), TrainConfig(lora_r=16)):
        assert "lora_r cannot change when a run is resumed" in kept_on_resume(old, new.to_dict())
    assert kept_on_resume(old, TrainConfig(lora_r=8, lora_alpha=4.0).to_dict()) is None
    assert kept_on_resume({}, TrainConfig().to_dict()) is None  # a config saved before adapters existed
    # lora_alpha spelt out as its default (2r) is no change; another alpha or other targets are changes to accept
    assert computation_changes(old, TrainConfig(lora_r=8, lora_alpha=16.0).to_dict()) == {}
    assert set(computation_changes(old, TrainConfig(lora_r=8, lora_alpha=4.0).to_dict())) == {"lora_alpha"}
    assert set(computation_changes(old, TrainConfig(lora_r=8, lora_targets=("query",)).to_dict())) == {"lora_targets"}


def test_a_resume_with_the_default_targets_spelt_out_continues_and_other_targets_are_refused(tmp_path, tiny_dir):
    kwargs = dict(max_steps=4, save_every_steps=2, batch_size=4)
    lora_run(tmp_path, tiny_dir, **kwargs)
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step_00000004")
    config = tiny_config(tmp_path, model=str(tiny_dir), lora_r=4, lr=1e-2, save_model=True, **kwargs)
    spelt = config.replace(lora_targets=("query", "key", "value"), resume="latest", accept_changes=True)
    assert engine.fit(spelt)["steps"] == 4
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step_00000004")
    other = config.replace(lora_targets=("query", "dense"), resume="latest", accept_changes=True)
    with pytest.raises(ValueError, match="its model has other weights than this run's"):
        engine.fit(other)


def test_an_adapter_goes_only_on_a_base_it_fits(tmp_path, tiny_dir, tokenizer, caplog):
    lora_run(tmp_path, tiny_dir)
    final = tmp_path / "run" / "final_model"
    adapter = final / "adapter"
    with pytest.raises(ValueError, match="is the model this adapter was merged into, not its base"):
        adapters.load_trained(adapter, base_model=str(final))
    shallow = tmp_path / "shallow"
    make_tiny(num_hidden_layers=1).save_pretrained(shallow)
    tokenizer.save_pretrained(shallow)
    with pytest.raises(ValueError, match=r"trained on a model of 2 encoder layers; its base .* has 1"):
        adapters.load_trained(adapter, base_model=str(shallow))
    # A base that moved: the error names where it was recorded and what to do
    moved = tmp_path / "moved"
    shutil.copytree(adapter, moved)
    meta = json.loads((moved / "bertqa.json").read_text())
    (moved / "bertqa.json").write_text(json.dumps({**meta, "base_model": str(tmp_path / "gone")}))
    with pytest.raises(OSError, match=r"the base model of the adapter .*moved.*named in .*bertqa.json.*pass its base"):
        adapters.load_trained(moved)
    caplog.set_level("WARNING", logger="bertqa")
    adapters.load_trained(moved, base_model=str(tiny_dir))
    assert "names the base" in caplog.text and "putting it on" in caplog.text
    # Where a whole model is needed, an adapter folder is named as one
    with pytest.raises(FileNotFoundError, match=r"is a LoRA adapter, not a whole model: pass .*final_model"):
        engine.fit(tiny_config(tmp_path / "again", model=str(adapter)))


def test_a_relative_model_folder_is_recorded_as_the_folder_it_is(tmp_path, tiny_dir, monkeypatch):
    from bertqa.model import build_model, model_name

    monkeypatch.chdir(tiny_dir.parent)
    assert model_name(build_model(tiny_dir.name)) == str(tiny_dir.resolve())
    assert model_name(make_tiny()) is None  # random weights: no base to load again


def test_a_model_that_already_has_adapters_is_not_given_more(tiny_model):
    from bertqa.training.setup import adapt

    wrapped = adapters.add_lora(tiny_model, r=4, alpha=None, dropout=0.0)
    with pytest.raises(ValueError, match="already has peft adapters; set lora_r 0 to train them as they are"):
        adapt(TrainConfig(lora_r=4), wrapped)


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"lora_r": -1}, "lora_r must be a whole number >= 0"),
        ({"lora_r": 4, "lora_alpha": 0.0}, "lora_alpha must be positive"),
        ({"lora_r": 4, "lora_dropout": 1.0}, r"lora_dropout must be in \[0, 1\)"),
        ({"lora_r": 4, "lora_targets": ("query,value",)}, "one per item"),
        ({"lora_r": 4, "lora_targets": ("query", "query")}, "names a layer twice"),
        ({"lora_r": 4, "compile": True}, "lora_r with compile"),
    ],
)
def test_bad_lora_settings_are_refused_by_name(changes, expected):
    with pytest.raises(ValueError, match=expected):
        TrainConfig(**changes)


def test_lora_settings_without_lora_r_are_said_to_do_nothing():
    assert TrainConfig(lora_alpha=32.0, lora_targets=("query",)).unused_settings() == [
        ("lora_alpha", "lora_r"),
        ("lora_targets", "lora_r"),
    ]


def test_layer_wise_lr_decay_places_the_adapters_at_their_layers_depths(tiny_model):
    model = adapters.add_lora(tiny_model, r=4, alpha=None, dropout=0.0, targets=())
    depths = optim.layer_depths(model)
    assert {d for n, d in depths.items() if ".layer.0." in n} == {1}
    assert {d for n, d in depths.items() if ".layer.1." in n} == {2}
    assert {d for n, d in depths.items() if "qa_outputs" in n} == {3}
    groups = optim.build_optimizer(model, lr=1.0, weight_decay=0.0, eps=1e-8, layer_lr_decay=0.5).param_groups
    assert {g["name"]: g["lr"] for g in groups} == {"layer 0": 0.25, "layer 1": 0.5, "head": 1.0}


def test_a_lora_student_distils_from_a_teacher(tmp_path, tiny_dir, caplog):
    caplog.set_level("INFO", logger="bertqa")
    summary = lora_run(tmp_path, tiny_dir, teacher=str(tiny_dir), distill_alpha=0.5)
    assert "distilling from teacher" in caplog.text and "LoRA r=4" in caplog.text
    assert summary["steps"] > 0 and (tmp_path / "run/final_model/adapter/adapter_config.json").is_file()


def test_a_lora_run_of_a_shortened_student_reloads_its_adapter_on_the_shortened_base(tmp_path, tiny_dir, tokenizer):
    lora_run(tmp_path, tiny_dir, num_layers=1)
    final = tmp_path / "run" / "final_model"
    plain = AutoModelForQuestionAnswering.from_pretrained(final)
    assert plain.config.num_hidden_layers == 1
    on_base = adapters.load_trained(final / "adapter")
    assert on_base.config.num_hidden_layers == 1
    assert torch.allclose(logits(on_base, tokenizer), logits(plain, tokenizer), atol=1e-5)


def test_a_lora_run_to_a_time_budget_plans_and_ends(tmp_path, tiny_dir, caplog):
    caplog.set_level("INFO", logger="bertqa")
    changes = dict(time_budget="20s", epochs=2.0, max_train_examples=200, mixed_precision="no")
    summary = lora_run(tmp_path, tiny_dir, **changes)
    plan = summary["budget_plan"]
    assert plan is not None and summary["steps"] >= plan["probe_updates"] and "LoRA r=4" in caplog.text
    assert summary["steps"] <= plan["cap_steps"]


def test_a_sweep_over_lora_r_runs_with_and_without_adapters(tmp_path, tiny_dir):
    from tests.test_scripts import script
    from tests.test_sweep import SWEEP

    out = tmp_path / "sweep"
    args = ["--model", tiny_dir, *SWEEP, "--param", "lora_r=0,4", "--sampler", "grid", "--output-dir", out]
    result = script("sweep.py", *args)
    trials = [json.loads((t / "config.json").read_text())["lora_r"] for t in sorted(out.glob("trial-*"))]
    assert sorted(trials) == [0, 4] and result.stderr.count("LoRA r=4 (alpha 8") == 1


def test_gradient_checkpointing_gives_the_same_losses_and_says_its_cost(tmp_path, caplog):
    caplog.set_level("INFO", logger="bertqa")
    runs = []
    for checkpointing in (False, True):
        config = tiny_config(tmp_path / str(checkpointing), gradient_checkpointing=checkpointing, batch_size=4)
        engine.fit(config, model=make_tiny(hidden_dropout_prob=0.1))  # dropout: its random masks recomputed alike
        log = (tmp_path / str(checkpointing) / "run/train_log.jsonl").read_text().splitlines()
        runs.append([r["loss"] for r in map(json.loads, log) if "loss" in r])
    assert runs[0] == pytest.approx(runs[1], rel=1e-5)
    assert "gradient checkpointing: each encoder layer keeps only its input" in caplog.text


def test_gradient_checkpointing_with_lora_and_frozen_embeddings_reaches_the_lowest_adapters(tiny_model):
    from bertqa.training.setup import adapt

    model = adapt(TrainConfig(lora_r=4, gradient_checkpointing=True, freeze_embeddings=True), tiny_model).train()
    batch = {"input_ids": torch.randint(5, 1000, (2, 16)), "start_positions": torch.tensor([1, 2])}
    model(**batch, end_positions=torch.tensor([3, 4])).loss.backward()
    lowest = [p.grad for n, p in model.named_parameters() if ".layer.0." in n and "lora_B" in n]
    assert lowest and all(g is not None and g.abs().sum() > 0 for g in lowest)


def test_each_evaluation_and_the_summary_carry_the_peak_memory(tmp_path, tiny_model):
    summary = engine.fit(tiny_config(tmp_path, eval_before_training=True), model=tiny_model)
    records = [json.loads(x) for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    peaks = [r["peak_memory_mib"] for r in records if "f1" in r]
    assert len(peaks) == 2 and all(p > 50 for p in peaks) and peaks == sorted(peaks)
    assert summary["peak_memory_mib"] >= peaks[-1] and summary["peak_memory_of"] == "cpu_peak_rss"


@pytest.mark.e2e
def test_a_lora_run_of_two_processes_resumes_exactly(tmp_path, tiny_dir):
    from tests.test_scripts import SMALL, script, two_processes

    args = ["--model", tiny_dir, *SMALL, "--lora-r", "4", "--max-steps", "6", "--save-every-steps", "2"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    result = script("train.py", *args, "--keep-checkpoints", "5", "--output-dir", straight, launch=two_processes())
    assert "2 processes" in result.stderr and result.stderr.count("LoRA r=4") == 1  # said by the main process
    # The same run, stopped after update 2: its folder as the straight run's was then
    shutil.copytree(straight, resumed)
    for later in ("final_model", "best_model", "checkpoints/step_00000004", "checkpoints/step_00000006"):
        shutil.rmtree(resumed / later)
    again = script("train.py", *args, "--resume", "latest", "--output-dir", resumed, launch=two_processes())
    assert "step_00000002 at step 2" in again.stderr
    a, b = (dict(adapters_of(run / "final_model")) for run in (straight, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.e2e
def test_an_adapter_folder_exports_to_onnx_and_answers_as_its_merged_model(tmp_path, tiny_dir):
    from bertqa.deploy.export import export_onnx
    from bertqa.deploy.serving import Answerer

    lora_run(tmp_path, tiny_dir)
    final = tmp_path / "run" / "final_model"
    export_onnx(final / "adapter", tmp_path / "onnx", check_questions=8)
    exported = [a.to_dict() for a in Answerer(tmp_path / "onnx")(QUESTIONS)]
    merged = [a.to_dict() for a in Answerer(final, precision="no")(QUESTIONS)]
    assert [a["answer"] for a in exported] == [a["answer"] for a in merged]
    assert [a["score"] for a in exported] == pytest.approx([a["score"] for a in merged], abs=1e-3)
    with pytest.raises(ValueError, match="is an exported model, not a LoRA adapter"):
        Answerer(tmp_path / "onnx", base_model=str(tiny_dir))
