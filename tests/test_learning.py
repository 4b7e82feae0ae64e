"""It learns: the real pretrained MiniLM fine-tuned briefly on real SQuAD beats its untrained self by far (slow)."""

from __future__ import annotations

import json
import math

import pytest

from bertqa import engine
from bertqa.config import TrainConfig


@pytest.mark.slow
def test_short_finetune_raises_dev_f1_far_above_the_untrained_model(tmp_path):
    config = TrainConfig(
        model="minilm-l6",
        train_data="train-v1.1",
        eval_data="dev-v1.1",
        max_train_examples=2400,
        max_seq_length=256,
        doc_stride=96,
        max_eval_examples=200,
        epochs=1.0,
        batch_size=16,
        lr=1e-4,
        eval_before_training=True,
        log_every=5,
        save_model=False,
        output_dir=str(tmp_path / "run"),
    )
    summary = engine.fit(config)
    evals = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    before, after = evals[0], evals[-1]
    assert before["step"] == 0 and after["step"] == summary["steps"] > 30
    assert summary["label_report"].match_rate >= 0.995
    records = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]  # the first record is the learning rate at step 0
    # Chance is about ln(window length) ~ 5; the notebook that never learned stayed there.
    assert losses[0] > 4.5 and losses[-1] < 0.8 * math.log(170)
    print(
        f"dev F1 untrained {before['f1']:.1f} -> fine-tuned {after['f1']:.1f} (EM {before['exact']:.1f} -> "
        f"{after['exact']:.1f}); loss {losses[0]:.2f} -> {losses[-1]:.2f}"
    )
    assert after["f1"] > before["f1"] + 15 and after["exact"] > before["exact"] + 10
