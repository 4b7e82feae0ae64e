"""Shared fixtures: the real offline tokenizer and a tiny BERT built from a config (fast, random weights)."""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest
import torch

from bertqa.config import TrainConfig
from bertqa.model import build_model, build_tokenizer

# Tests run offline: a hub lookup must fail at once instead of retrying (the scripts' subprocesses inherit this).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

TINY = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "hidden_dropout_prob": 0.0,
    "attention_probs_dropout_prob": 0.0,
}


def make_tiny(seed: int = 0, **overrides: float) -> torch.nn.Module:
    """A 2-layer, 32-wide BERT QA model with MiniLM's vocabulary, initialised from `seed`."""
    torch.manual_seed(seed)
    return build_model("minilm-l6", pretrained=False, config_overrides={**TINY, **overrides})


def as_records(examples, *, ids: bool = False) -> list[dict]:
    """Examples as records in the file schema (title, context, question, answers{text, answer_start}[, id])."""
    return [
        {
            **({"id": ex.id} if ids else {}),
            "title": ex.title,
            "context": ex.context,
            "question": ex.question,
            "answers": {"text": list(ex.answer_texts), "answer_start": list(ex.answer_starts)},
        }
        for ex in examples
    ]


def tiny_config(tmp_path, **changes) -> TrainConfig:
    base = dict(
        model="minilm-l6",
        train_data="dev-v1.1",
        eval_data="dev-v1.1",
        max_train_examples=40,
        max_eval_examples=12,
        max_seq_length=128,
        doc_stride=32,
        max_query_length=32,
        batch_size=8,
        eval_batch_size=16,
        epochs=1.0,
        lr=1e-3,
        log_every=1,
        output_dir=str(tmp_path / "run"),
        save_model=False,
        label_check_min=0.9,
        cache_dir=None,
    )
    return TrainConfig(**{**base, **changes})


def reset_accelerate() -> None:
    """Forget Accelerate's process-wide singletons: the process state, the accelerator's (its precision: bf16 on
    CPUs that have it) and the gradient state (the accumulation steps and the loaders of the last `prepare`)."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)  # what Accelerate's own test cases do between tests
    GradientState._reset_state()


@pytest.fixture(autouse=True)
def fresh_process_state():
    """Each test starts, and leaves, the process as a new one would have it: Accelerate's singletons reset (a run
    keeps the precision of the first Accelerator in its process), the settings a run changes put back, and the
    "bertqa" logger as it was. So any order of tests passes (checked with pytest-randomly, see docs/BENCHMARKS.md)."""
    import logging

    reset_accelerate()
    logger = logging.getLogger("bertqa")
    handlers, level = list(logger.handlers), logger.level
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    threads = torch.get_num_threads()
    yield
    reset_accelerate()
    logger.handlers[:] = handlers
    logger.setLevel(level)
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer("minilm-l6")


@pytest.fixture(scope="session")
def tiny() -> Callable[..., torch.nn.Module]:
    """The tiny model factory: `tiny()`, `tiny(seed=1)`, `tiny(hidden_dropout_prob=0.1)`."""
    return make_tiny


@pytest.fixture
def tiny_model() -> torch.nn.Module:
    return make_tiny()


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, tokenizer):
    """The tiny model saved as a Hugging Face folder with its tokenizer, for the scripts."""
    path = tmp_path_factory.mktemp("tiny")
    make_tiny().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def family_dirs(tmp_path_factory):
    """Tiny BERT, RoBERTa and DeBERTa-v2 models saved as plain Hugging Face folders (`tests.families`), built once."""
    from tests.families import save_families

    return save_families(tmp_path_factory.mktemp("families"))
