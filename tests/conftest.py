"""Shared fixtures: the real offline tokenizer and a tiny BERT built from a config (fast, random weights)."""

from __future__ import annotations

import pytest

from bertqa.model import build_model, build_tokenizer

TINY = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "hidden_dropout_prob": 0.0,
    "attention_probs_dropout_prob": 0.0,
}


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer("minilm-l6")


@pytest.fixture
def tiny_model():
    import torch

    torch.manual_seed(0)
    return build_model("minilm-l6", pretrained=False, config_overrides=TINY)
