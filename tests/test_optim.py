"""Layer-wise learning rates and optimizers of your own: depths for each architecture, the LRs along the schedule,
and runs that resume with them."""

from __future__ import annotations

import json

import pytest
import torch

from bertqa import engine
from bertqa.config import TrainConfig
from bertqa.training import optim
from tests.conftest import tiny_config

SMALL = dict(vocab_size=100, hidden_size=16, num_hidden_layers=3, num_attention_heads=2, intermediate_size=32)


def tiny_of(kind: str) -> torch.nn.Module:
    """A 3-layer QA model of another architecture, from its config (random weights)."""
    import transformers as t

    configs = {
        "roberta": lambda: t.RobertaConfig(**SMALL),
        "electra": lambda: t.ElectraConfig(**SMALL, embedding_size=8),  # with embeddings_project
        "deberta": lambda: t.DebertaV2Config(**SMALL, relative_attention=True, position_buckets=8),
        "distilbert": lambda: t.DistilBertConfig(vocab_size=100, dim=16, n_layers=3, n_heads=2, hidden_dim=32),
        "albert": lambda: t.AlbertConfig(**SMALL, embedding_size=8),
    }
    return t.AutoModelForQuestionAnswering.from_config(configs[kind]())


@pytest.mark.parametrize("kind", ["roberta", "electra", "deberta", "distilbert"])
def test_every_parameter_of_each_architecture_gets_a_depth(kind):
    model = tiny_of(kind)
    depths = optim.layer_depths(model)
    assert set(depths) == {n for n, _ in model.named_parameters()}
    assert sorted(set(depths.values())) == [0, 1, 2, 3, 4]  # embeddings, 3 layers, head
    assert all(depths[n] == 4 for n in depths if n.startswith("qa_outputs"))
    assert all(depths[n] == 0 for n in depths if "embeddings" in n)
    for i in range(3):
        assert all(depths[n] == i + 1 for n in depths if f"layer.{i}." in n)


def test_a_model_that_shares_its_layers_is_refused_by_name():
    with pytest.raises(ValueError, match="layer_lr_decay cannot layer AlbertForQuestionAnswering"):
        optim.layer_depths(tiny_of("albert"))


def test_layer_decay_lrs_from_the_head_down_along_the_schedule(tiny_model):
    opt = optim.build_optimizer(tiny_model, lr=1e-3, weight_decay=0.01, eps=1e-8, layer_lr_decay=0.5)
    sched = optim.build_scheduler(opt, total_steps=10, warmup_steps=2)
    peaks = {g["name"]: g["initial_lr"] for g in opt.param_groups}
    assert peaks == pytest.approx({"head": 1e-3, "layer 1": 5e-4, "layer 0": 2.5e-4, "embeddings": 1.25e-4})
    assert {g["name"]: g["weight_decay"] for g in opt.param_groups if g["decay"]}["layer 0"] == 0.01
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(tiny_model.parameters()))
    for _ in range(5):
        opt.step()
        sched.step()
    lrs = {g["name"]: g["lr"] for g in opt.param_groups}
    assert lrs["head"] == pytest.approx(1e-3 * 5 / 8) and lrs["embeddings"] == pytest.approx(lrs["head"] / 8)
    text = optim.describe_groups(opt)
    assert "embeddings: peak lr 0.000125" in text and "head: peak lr 0.001" in text


def test_config_refuses_a_decay_outside_0_1():
    for bad in (0.0, 1.5, -0.2):
        with pytest.raises(ValueError, match=r"layer_lr_decay must be in \(0, 1\]"):
            TrainConfig(layer_lr_decay=bad)


def test_a_resumed_run_gets_its_own_per_layer_lrs_back(tmp_path, tiny):
    built, seen = [], []

    def adamw(lr):  # the default optimizer with layer decay, kept to read its groups' LRs
        def factory(model):
            built.append(optim.build_optimizer(model, lr=lr, weight_decay=0.01, eps=1e-8, layer_lr_decay=0.5))
            return built[-1]

        return factory

    def record(update):
        seen.append([g["lr"] for g in built[-1].param_groups])

    config = tiny_config(tmp_path, epochs=2.0, batch_size=4)
    engine.fit(config, model=tiny(), optimizer=adamw(1e-3), callbacks=[record])
    straight = list(seen)
    seen.clear()
    short = config.replace(output_dir=str(tmp_path / "b"), max_steps=2)
    engine.fit(short, model=tiny(), optimizer=adamw(1e-3))
    resumed = short.replace(max_steps=None, resume="latest", accept_changes=True)
    engine.fit(resumed, model=tiny(), optimizer=adamw(2e-3), callbacks=[record])  # twice the peak from update 3
    assert len(seen) == len(straight) - 2
    for after, before in zip(seen, straight[2:]):  # every group, not the checkpoint's LRs but this run's
        assert after == pytest.approx([2 * lr for lr in before])
    assert seen[0][-1] / seen[0][0] == pytest.approx(8)  # the head (last group) at 8x the embeddings (first)


def test_your_own_optimizer_trains_on_bertqas_schedule(tmp_path, tiny):
    config = tiny_config(tmp_path, epochs=1.0, batch_size=4, warmup_ratio=0.5, lr=1e-3)
    summary = engine.fit(config, model=tiny(), optimizer=lambda m: torch.optim.SGD(m.parameters(), lr=0.5))
    log = [json.loads(x) for x in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    total = summary["steps"]
    warmup = round(0.5 * total)
    lrs = {r["step"]: r["lr"] for r in log}
    assert lrs[0] == 0 and lrs[warmup] == pytest.approx(0.5) and lrs[total] == pytest.approx(0)  # SGD's own peak


def test_the_logged_lr_is_the_peak_groups_with_layer_decay(tmp_path, tiny):
    seen = []
    config = tiny_config(tmp_path, max_steps=3, warmup_ratio=0.0, schedule="constant", layer_lr_decay=0.5, lr=1e-3)
    engine.fit(config, model=tiny(), callbacks=[lambda u: seen.append(u.lr)])
    assert seen == pytest.approx([1e-3] * 3)  # the head's, not the embeddings' 1.25e-4


@pytest.mark.parametrize("kind", ["roberta", "electra", "deberta", "distilbert"])
def test_freezing_the_bottom_stops_training_the_embeddings_and_the_lowest_layers(kind):
    model = tiny_of(kind)
    depths = optim.layer_depths(model)
    trainable, total = optim.freeze_bottom(model, embeddings=True, layers=2)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {n for n, d in depths.items() if d <= 2}
    assert total == sum(p.numel() for p in model.parameters())
    assert trainable == sum(p.numel() for n, p in model.named_parameters() if n not in frozen) > 0


def test_freezing_layers_alone_keeps_the_embeddings_training(tiny_model):
    depths = optim.layer_depths(tiny_model)
    optim.freeze_bottom(tiny_model, embeddings=False, layers=1)
    frozen = {n for n, p in tiny_model.named_parameters() if not p.requires_grad}
    assert frozen == {n for n, d in depths.items() if d == 1}


def test_freezing_more_layers_than_the_model_has_is_refused_by_name(tiny_model):
    layers = tiny_model.config.num_hidden_layers
    with pytest.raises(ValueError, match=f"freeze_layers={layers + 1}: .* has {layers} encoder layers"):
        optim.freeze_bottom(tiny_model, embeddings=True, layers=layers + 1)
    with pytest.raises(ValueError, match="freeze_layers cannot layer AlbertForQuestionAnswering"):
        optim.freeze_bottom(tiny_of("albert"), embeddings=True, layers=1)
    with pytest.raises(ValueError, match="freeze_layers must be a whole number >= 0"):
        TrainConfig(freeze_layers=-1)


def test_a_run_with_a_frozen_bottom_leaves_it_as_it_was_and_trains_the_rest(tmp_path, tiny):
    model = tiny()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    config = tiny_config(tmp_path, max_steps=3, lr=1e-2, freeze_embeddings=True, freeze_layers=1)
    engine.fit(config, model=model)
    depths = optim.layer_depths(tiny(), setting="test", frozen=True)
    for name, param in model.named_parameters():
        assert torch.equal(param.detach(), before[name]) == (depths[name] <= 1), name


def test_hidden_dropout_is_set_in_the_models_config(tmp_path):
    from bertqa.model import build_model

    model = build_model("minilm-l6", pretrained=False, config_overrides={"num_hidden_layers": 1}, hidden_dropout=0.0)
    assert model.config.hidden_dropout_prob == 0.0
    with pytest.raises(ValueError, match="hidden_dropout must be in"):
        TrainConfig(hidden_dropout=1.0)
