"""The model factory's attention-dropout setting."""

from __future__ import annotations

import pytest
import torch

from bertqa import model as model_module
from bertqa.config import TrainConfig
from tests.conftest import TINY


def _two_training_passes(attention_dropout: float) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    shape = {k: v for k, v in TINY.items() if k != "attention_probs_dropout_prob"}
    net = model_module.build_model("minilm-l6", pretrained=False, config_overrides=shape,
                                   attention_dropout=attention_dropout).train()  # fmt: skip
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
