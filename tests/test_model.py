"""The model factory: the attention-dropout setting, and names that are local paths but not model folders."""

from __future__ import annotations

import pytest
import torch

from bertqa import model as model_module
from bertqa.config import TrainConfig
from bertqa.deploy.serving import Answerer
from tests.conftest import TINY


def _two_training_passes(attention_dropout: float) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    shape = {k: v for k, v in TINY.items() if k != "attention_probs_dropout_prob"}
    net = model_module.build_model(
        "minilm-l6", pretrained=False, config_overrides=shape, attention_dropout=attention_dropout
    ).train()
    ids = torch.randint(1000, 2000, (2, 24))
    return net(input_ids=ids).start_logits, net(input_ids=ids).start_logits


def test_attention_dropout_is_what_training_uses():
    first, second = _two_training_passes(0.0)
    assert torch.equal(first, second)  # no other dropout in TINY: without attention dropout the passes agree
    first, second = _two_training_passes(0.5)
    assert not torch.equal(first, second)


def test_a_model_without_an_attention_dropout_setting_is_refused(monkeypatch):
    monkeypatch.setattr(model_module, "ATTENTION_DROPOUT_KEYS", ("no_such_key",))
    with pytest.raises(ValueError, match=r"no_such_key.*attention_dropout cannot be set"):
        model_module.build_model("minilm-l6", pretrained=False, config_overrides=TINY, attention_dropout=0.0)


def test_attention_dropout_out_of_range_is_refused():
    with pytest.raises(ValueError, match="attention_dropout must be in"):
        TrainConfig(attention_dropout=1.0)


# ---------------------------------------------------------------------------------------- names that are local paths


@pytest.fixture
def no_hub(monkeypatch):
    """Fails a test that asks the hub (or its cache) about a name that can only be a local path."""

    def asked(*args, **kwargs):
        raise AssertionError(f"the hub was asked about {args[:1]}")

    from transformers import AutoConfig, AutoModelForQuestionAnswering, AutoTokenizer

    from bertqa import hub

    monkeypatch.setattr(hub, "hub_unreachable", asked)
    for cls in (AutoTokenizer, AutoConfig, AutoModelForQuestionAnswering):
        monkeypatch.setattr(cls, "from_pretrained", asked)


def make_run(root, *saved: str, steps: tuple[str, ...] = ()) -> None:
    """A training run's folder as fit leaves it: its TrainConfig as config.json, the models and checkpoints named."""
    root.mkdir(parents=True)
    TrainConfig(output_dir=str(root)).save(root / "config.json")
    for name in saved:
        (root / name).mkdir()
        (root / name / "config.json").write_text('{"model_type": "bert"}')
    for step in steps:
        (root / "checkpoints" / step).mkdir(parents=True)


@pytest.mark.parametrize(
    "build", [model_module.build_model, model_module.build_tokenizer, model_module.resolve_model, Answerer]
)
def test_a_mistyped_folder_is_named_with_the_nearest_one_without_asking_the_hub(tmp_path, monkeypatch, no_hub, build):
    monkeypatch.chdir(tmp_path)
    make_run(tmp_path / "runs" / "quick", "final_model", "best_model")
    for typed in ("runs/quick/final_modle", "runs/quikc/final_modle", "./runs/quick/final_modle"):
        with pytest.raises(model_module.ModelNotFoundError) as err:
            build(typed)
        assert str(err.value) == f"model folder {typed!r} does not exist; did you mean runs/quick/final_model?"
    with pytest.raises(
        model_module.ModelNotFoundError,
        match=r"'runs/quick/zzz' does not exist \(runs/quick holds: "
        r"best_model, checkpoints, config.json, final_model\)",
    ):
        (tmp_path / "runs" / "quick" / "checkpoints").mkdir()
        build("runs/quick/zzz")
    absent = tmp_path / "elsewhere" / "final_model"
    with pytest.raises(model_module.ModelNotFoundError) as err:
        build(str(absent))
    assert str(err.value) == f"model folder '{absent}' does not exist ({tmp_path} holds: runs)"


def test_hub_ids_are_left_to_the_hub(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("bert-base-uncased", "google/electra-base-discriminator"):
        assert model_module.resolve_model(name) == name  # no local folder: a hub id
    assert not model_module.looks_local("google/electra-base-discriminator")
    (tmp_path / "google").mkdir()  # now google/... is a path in a local folder
    assert model_module.looks_local("google/electra-base-discriminator")
    assert all(model_module.looks_local(n) for n in ("./m", "~/m", "/m", "runs/a/b", "m/"))


@pytest.mark.parametrize("build", [model_module.build_model, model_module.build_tokenizer, Answerer])
def test_a_training_runs_folder_is_named_with_the_models_it_saved(tmp_path, no_hub, build):
    run = tmp_path / "mk"
    make_run(run, "final_model", "best_model", steps=("step_00000010",))
    with pytest.raises(model_module.ModelNotFoundError) as err:
        build(run)
    assert str(err.value) == (
        f"{run} is a training run's folder, not a model folder; pass the model it saved: {run}/final_model or "
        f"{run}/best_model"
    )
    with pytest.raises(model_module.ModelNotFoundError, match="is a checkpoint of the training run"):
        build(run / "checkpoints" / "step_00000010")
    with pytest.raises(model_module.ModelNotFoundError, match="is a file; a model is a folder"):
        build(run / "config.json")


def test_a_run_that_saved_no_model_yet_names_its_checkpoints(tmp_path, no_hub):
    run = tmp_path / "mk"
    make_run(run, steps=("step_00000010", "step_00000020"))
    with pytest.raises(model_module.ModelNotFoundError) as err:
        model_module.build_tokenizer(run)
    said = str(err.value)
    assert said.startswith(f"{run} is a training run's folder, not a model folder; the run has saved no model yet")
    assert f"{run}/checkpoints (the last step_00000020)" in said and "--resume latest" in said
    best_only = tmp_path / "best-only"
    make_run(best_only, "best_model")
    with pytest.raises(model_module.ModelNotFoundError, match=f"pass the model it saved: {best_only}/best_model$"):
        model_module.build_model(best_only)


def test_a_model_folder_with_a_run_beside_it_still_loads(tmp_path, tiny_dir):
    # A run's own final_model is a model folder, though its parent is a run.
    run = tmp_path / "mk"
    make_run(run)
    import shutil

    shutil.copytree(tiny_dir, run / "final_model")
    assert model_module.resolve_model(run / "final_model") == str(run / "final_model")
    assert model_module.build_tokenizer(run / "final_model").is_fast
