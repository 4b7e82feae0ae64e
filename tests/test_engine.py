"""Engine: LR schedule, optimizer groups, accumulation, overfitting, NaN guard, callbacks, checkpoints and resume."""

from __future__ import annotations

import json
import logging
import math
import re
import sys

import numpy as np
import pytest
import torch

from bertqa import batching, data, engine, sources
from bertqa.data import Window
from bertqa.examples import SquadFormatError
from bertqa.inference import eval_batches, predict_logits
from bertqa.model import build_model
from bertqa.training import optim
from bertqa.training.checkpoint import latest_checkpoint, list_checkpoints
from tests.conftest import TINY, as_records, tiny_config


def weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# --------------------------------------------------------------------------------------------------------- pieces


def lrs_seen(total_steps, warmup_steps, schedule="linear"):
    """The learning rate the optimizer uses at each of `total_steps` updates (read from the optimizer itself)."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = optim.build_scheduler(opt, total_steps=total_steps, warmup_steps=warmup_steps, schedule=schedule)
    seen = []
    for _ in range(total_steps + 1):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return seen


def test_schedule_warmup_and_decay():
    linear = lrs_seen(10, 4)
    assert linear[0] == 0.0 and linear[2] == 0.5 and linear[4] == 1.0
    assert linear[7] == pytest.approx(0.5) and linear[10] == 0.0
    cosine = lrs_seen(10, 0, "cosine")
    assert cosine[0] == 1.0 and cosine[5] == pytest.approx(0.5) and cosine[10] == pytest.approx(0.0)
    assert set(lrs_seen(6, 2, "constant")[2:]) == {1.0}


def test_no_weight_decay_on_biases_and_layernorm(tiny_model):
    # With zero gradients AdamW's only change is the decay: matrices shrink, biases and LayerNorm weights do not.
    opt = optim.build_optimizer(tiny_model, lr=0.1, weight_decay=0.5, eps=1e-8)
    before = {n: p.detach().clone() for n, p in tiny_model.named_parameters()}
    for p in tiny_model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for name, p in tiny_model.named_parameters():
        decayed = not torch.equal(p, before[name])
        assert decayed == (p.dim() >= 2), name
    assert any(n.endswith("LayerNorm.weight") for n in before) and any(n.endswith("query.weight") for n in before)


def test_update_counts_for_accumulation_and_max_steps():
    assert optim.count_updates(10, grad_accum=3, epochs=2.0, max_steps=None) == (4, 8)  # a short last round counts
    assert optim.count_updates(10, grad_accum=1, epochs=0.5, max_steps=None) == (10, 5)
    assert optim.count_updates(10, grad_accum=1, epochs=2.0, max_steps=7) == (10, 7)


@pytest.fixture(scope="module")
def small_features(tokenizer):
    examples, _ = sources.load_examples("dev-v1.1", max_examples=8, seed=3)
    features = data.tokenize_examples(examples, tokenizer, Window(96, 32, 32))
    return data.label_features(features, examples)


def run_epoch(
    model, features, tokenizer, *, batch_size, grad_accum, lr=1e-2, steps=100, callbacks=(), loss_fn=None, sgd=False
):
    from accelerate import Accelerator

    accelerator = Accelerator(gradient_accumulation_steps=grad_accum, cpu=True)
    loader = torch.utils.data.DataLoader(
        batching.FeatureDataset(features),
        batch_size=batch_size,
        collate_fn=batching.Collator(tokenizer.pad_token_id),
    )
    # SGD where updates are compared: Adam's first step is lr * sign(grad), which blows rounding noise in
    # near-zero gradients (e.g. biases that softmax is invariant to) up to full-size differences.
    opt = (
        torch.optim.SGD(model.parameters(), lr=lr)
        if sgd
        else optim.build_optimizer(model, lr=lr, weight_decay=0.0, eps=1e-8)
    )
    model, opt, loader = accelerator.prepare(model, opt, loader)
    sched = optim.build_scheduler(opt, total_steps=steps, warmup_steps=0, schedule="constant")
    state = engine.TrainState()
    result = engine.train_one_epoch(
        accelerator,
        model,
        opt,
        sched,
        loader,
        state=state,
        max_steps=steps,
        max_grad_norm=0.0,
        log_every=1,
        compute_loss=loss_fn or engine.default_loss,
        callbacks=callbacks,
    )
    return state, result


def test_gradient_accumulation_2x2_equals_batch_4(small_features, tokenizer, tiny):
    features = small_features.select(range(4))
    big, small = tiny(), tiny()
    state_big, _ = run_epoch(big, features, tokenizer, batch_size=4, grad_accum=1, lr=1.0, sgd=True)
    state_small, _ = run_epoch(small, features, tokenizer, batch_size=2, grad_accum=2, lr=1.0, sgd=True)
    assert state_big.step == state_small.step == 1
    before = weights(tiny())
    for (name, a), b in zip(weights(big).items(), weights(small).values()):
        assert torch.allclose(a, b, atol=1e-6), name
    assert any(not torch.equal(before[k], v) for k, v in weights(big).items())  # it did update


def test_loss_falls_when_overfitting_one_batch(small_features, tokenizer, tiny):
    model = tiny()
    features = small_features
    losses = []
    for _ in range(25):
        _, result = run_epoch(model, features, tokenizer, batch_size=len(features), grad_accum=1, lr=3e-3)
        losses.append(result["train_loss"])
    assert losses[-1] < 0.3 * losses[0], losses


def test_nan_loss_raises_a_clear_error(small_features, tokenizer, tiny):
    def nan_loss(model, batch):
        return engine.default_loss(model, batch) * float("nan")

    with pytest.raises(engine.NonFiniteLossError, match="training loss is nan"):
        run_epoch(tiny(), small_features, tokenizer, batch_size=4, grad_accum=1, loss_fn=nan_loss)


def test_callbacks_called_once_per_update(small_features, tokenizer, tiny):
    seen = []
    state, _ = run_epoch(
        tiny(), small_features, tokenizer, batch_size=2, grad_accum=3, callbacks=[lambda u: seen.append(u.step)]
    )
    n_batches = math.ceil(len(small_features) / 2)
    assert seen == list(range(1, math.ceil(n_batches / 3) + 1)) and state.step == len(seen)


def test_evaluation_leaves_the_global_rng_alone(small_features, tokenizer, tiny):
    from accelerate import Accelerator

    model, accelerator = tiny(), Accelerator(cpu=True)
    before = torch.get_rng_state()
    for acc in (accelerator, None):  # the multi-process path and the plain one
        loader = eval_batches(small_features, batch_size=4, pad_token_id=tokenizer.pad_token_id, accelerator=acc)
        predict_logits(model, loader, accelerator=acc)
    assert torch.equal(before, torch.get_rng_state())  # so evaluating mid-run cannot change training's dropout


def test_one_logits_loop_gives_the_same_logits_with_and_without_an_accelerator(small_features, tokenizer, tiny):
    from accelerate import Accelerator

    model, accelerator = tiny(), Accelerator(cpu=True)
    results = []
    for acc, batch_size in ((accelerator, 3), (None, 5)):
        loader = eval_batches(
            small_features, batch_size=batch_size, pad_token_id=tokenizer.pad_token_id, accelerator=acc
        )
        results.append(predict_logits(model, loader, accelerator=acc))
    (start_a, end_a), (start_b, end_b) = results
    assert start_a.shape == (len(small_features), small_features.lengths.max())
    # Past a window's own length a row holds whatever the batch's padding produced: post-processing never reads it.
    real = np.arange(start_a.shape[1])[None, :] < small_features.lengths[:, None]
    assert np.allclose(start_a[real], start_b[real], atol=1e-5) and np.allclose(end_a[real], end_b[real], atol=1e-5)
    # Each row is its own window's logits, whatever batch it ran in: compare one window run alone.
    i = int(np.argmin(small_features.lengths))
    n = small_features.lengths[i]
    alone = model(
        input_ids=torch.tensor(small_features.input_ids[i], dtype=torch.long)[None],
        token_type_ids=torch.tensor(small_features.token_type_ids[i], dtype=torch.long)[None],
    )
    assert np.allclose(start_a[i, :n], alone.start_logits[0].detach().numpy(), atol=1e-4)


# ------------------------------------------------------------------------------------------------------------ fit


def test_fit_lr_schedule_with_accumulation(tmp_path, tiny):
    lrs = []
    config = tiny_config(tmp_path, batch_size=4, grad_accum=2, warmup_ratio=0.25, epochs=2.0, lr=1e-3)
    summary = engine.fit(config, model=tiny(), callbacks=[lambda u: lrs.append(u.lr)])
    windows = summary["label_report"].n_features
    per_epoch = math.ceil(math.ceil(windows / 4) / 2)
    total = 2 * per_epoch
    warmup = round(0.25 * total)
    assert len(lrs) == summary["steps"] == total
    assert lrs[0] == pytest.approx(1e-3 / warmup)
    assert lrs[warmup - 1] == pytest.approx(1e-3)
    assert lrs[-1] == pytest.approx(0.0)
    assert summary["epochs_done"] == 2


def test_fit_writes_logs_plot_and_models(tmp_path, tiny):
    config = tiny_config(tmp_path, save_model=True)
    summary = engine.fit(config, model=tiny())
    out = tmp_path / "run"
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(evals) == 1 and {"exact", "f1", "step"} <= set(evals[0])
    assert summary["final"]["f1"] == evals[0]["f1"]
    import matplotlib.image

    curves = matplotlib.image.imread(out / "training_curves.png")
    assert curves.shape[0] > 200 and curves.shape[1] > 600 and curves.std() > 0.01  # a drawn picture, not blank
    assert json.loads((out / "config.json").read_text())["max_seq_length"] == 128
    from transformers import AutoModelForQuestionAnswering, AutoTokenizer

    reloaded = AutoModelForQuestionAnswering.from_pretrained(out / "final_model")
    assert AutoTokenizer.from_pretrained(out / "final_model").is_fast
    assert reloaded.config.hidden_size == TINY["hidden_size"]
    meta = json.loads((out / "final_model" / "bertqa.json").read_text())
    assert meta["max_seq_length"] == 128 and meta["v2"] is False and meta["no_answer_threshold"] is None


def test_a_missing_plotting_library_skips_the_plot_and_says_so(tmp_path, monkeypatch, caplog):
    from bertqa.training import reporting

    (tmp_path / "train.jsonl").write_text(json.dumps({"step": 1, "loss": 2.0, "lr": 1e-3}) + "\n")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    out = tmp_path / "curves.png"
    assert reporting.plot_curves(tmp_path / "train.jsonl", tmp_path / "none.jsonl", out) is None
    assert not out.exists() and "matplotlib is not installed" in caplog.text


class Crash(RuntimeError):
    pass


def test_resume_gives_the_same_next_step_and_final_weights(tmp_path, tiny):
    # Dropout on: the resumed run must also restore the random state to match.
    kwargs = dict(epochs=2.0, batch_size=4, save_every_steps=3, keep_checkpoints=5)
    straight = tiny(hidden_dropout_prob=0.1)
    engine.fit(tiny_config(tmp_path / "a", **kwargs), model=straight)

    def crash(update):
        if update.step == 5:
            raise Crash

    with pytest.raises(Crash):
        engine.fit(tiny_config(tmp_path / "b", **kwargs), model=tiny(hidden_dropout_prob=0.1), callbacks=[crash])
    assert latest_checkpoint(tmp_path / "b" / "run").name == "step_00000003"
    resumed = tiny(seed=123, hidden_dropout_prob=0.1)  # different init: everything must come from the checkpoint
    engine.fit(tiny_config(tmp_path / "b", resume="latest", **kwargs), model=resumed)
    log_a = [json.loads(x) for x in (tmp_path / "a/run/train_log.jsonl").read_text().splitlines()]
    log_b = [json.loads(x) for x in (tmp_path / "b/run/train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log_b] == [r["step"] for r in log_a]  # logs after the checkpoint were replaced
    at_step_4 = [next(r["loss"] for r in log if r["step"] == 4) for log in (log_a, log_b)]  # first after resuming
    assert at_step_4[1] == pytest.approx(at_step_4[0], rel=1e-6)
    for (name, a), b in zip(weights(straight).items(), weights(resumed).values()):
        assert torch.allclose(a, b, atol=1e-6), name


def test_checkpoints_are_pruned_and_tmp_folders_ignored(tmp_path, tiny):
    out = tmp_path / "run"
    (out / "checkpoints" / "step_00000099.tmp").mkdir(parents=True)  # a save that was killed
    engine.fit(tiny_config(tmp_path, batch_size=4, save_every_steps=2, keep_checkpoints=2), model=tiny())
    names = [p.name for p in list_checkpoints(out)]
    assert len(names) == 2 and names == sorted(names)
    assert not list((out / "checkpoints").glob("*.tmp"))


def test_fit_with_own_examples_and_loss(tmp_path, tokenizer, tiny):
    examples, _ = sources.load_examples("dev-v1.1", max_examples=16, seed=5)
    calls = []

    def loss(model, batch):
        calls.append(batch["input_ids"].shape[0])
        return engine.default_loss(model, batch)

    summary = engine.fit(
        tiny_config(tmp_path),
        model=tiny(),
        tokenizer=tokenizer,
        train_examples=examples,
        eval_examples=examples[:4],
        compute_loss=loss,
    )
    assert sum(calls) == summary["label_report"].n_features
    assert summary["final"]["total"] == 4


def test_half_precision_checkpoints_load_as_float32_master_weights(tmp_path, tiny_model, tokenizer):
    tiny_model.half().save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    from transformers import AutoModelForQuestionAnswering

    assert next(AutoModelForQuestionAnswering.from_pretrained(tmp_path).parameters()).dtype == torch.float16
    model = build_model(tmp_path)  # what training gets: AdamW must not update half-precision weights
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert torch.equal(model.qa_outputs.weight, tiny_model.qa_outputs.weight.float())


def test_fit_takes_a_datasets_object_and_holds_out_evaluation_data(tmp_path, tiny):
    import datasets

    examples, _ = sources.load_examples("dev-v1.1", max_examples=60, seed=5)
    records = datasets.Dataset.from_list(as_records(examples))
    summary = engine.fit(
        tiny_config(tmp_path, eval_split=0.25, eval_data=None, max_eval_examples=None),
        model=tiny(),
        train_examples=records,
    )
    held = summary["final"]["total"]
    assert 0.25 * 60 <= held < 60 and summary["label_report"].n_examples == 60 - held


def test_v2_threshold_is_calibrated_on_held_out_training_questions(tmp_path, tiny):
    config = tiny_config(
        tmp_path,
        train_data="dev-v2.0[:20]",
        eval_data="dev-v2.0[20:]",
        save_model=True,
        max_train_examples=60,
        max_eval_examples=20,
    )
    summary = engine.fit(config, model=tiny())
    record = summary["final"]
    meta = json.loads((tmp_path / "run" / "final_model" / "bertqa.json").read_text())
    assert meta["no_answer_threshold"] == record["no_answer_threshold"]  # the calibrated one is shipped
    assert meta["threshold_calibrated_on"]["source"].startswith("5% of the training data")
    assert meta["threshold_calibrated_on"]["questions"] == 20 and meta["eval_data"] == "dev-v2.0[20:]"
    # The reported F1 is the one at the calibrated threshold; the evaluation set's own best is reported beside it.
    assert {"f1", "best_f1", "calibration_best_f1"} <= set(record) and record["f1"] <= record["best_f1"]
    # Its probabilities are measured on the same held-out questions; a calibration is fitted where they are off.
    fitted = [record[name] for name in ("temperature", "no_answer_scale", "no_answer_shift")]
    assert [meta[name] for name in ("temperature", "no_answer_scale", "no_answer_shift")] == fitted
    assert record["calibration_ece"] > 0.05 or fitted == [1.0, 1.0, 0.0]
    assert record["calibrated_ece"] <= record["calibration_ece"] + 1e-9


# ------------------------------------------------------------------------------------------ stops and observers


def test_qa_loss_is_the_same_for_a_window_however_far_its_batch_is_padded(small_features, tokenizer, tiny):
    model = tiny()
    rows = [batching.FeatureDataset(small_features)[i] for i in range(2)]
    short = batching.Collator(tokenizer.pad_token_id, pad_to_multiple_of=8)(rows)
    long = batching.Collator(tokenizer.pad_token_id, pad_to_multiple_of=128)(rows)
    assert long["input_ids"].shape[1] > short["input_ids"].shape[1]
    losses = [engine.default_loss(model, batch) for batch in (short, long)]
    assert torch.allclose(losses[0], losses[1], atol=1e-5)
    out = model(**engine.model_inputs(short))  # the pure function on logits computed once gives the same
    assert torch.equal(engine.qa_loss(out.start_logits, out.end_logits, short), losses[0])
    assert set(engine.model_inputs(short)) == {"input_ids", "attention_mask", "token_type_ids"}


def test_a_callback_stops_the_run_which_ends_as_usual_and_stays_stopped(tmp_path, tiny):
    def stop_at_3(update):
        if update.step == 3:
            raise engine.StopTraining("enough at 3")

    seen = []
    config = tiny_config(tmp_path, batch_size=4, epochs=2.0, save_model=True)
    summary = engine.fit(config, model=tiny(), callbacks=[stop_at_3, lambda u: seen.append(u.step)])
    out = tmp_path / "run"
    assert summary["stopped_early"] == "enough at 3" and summary["steps"] == 3 and summary["final"]["step"] == 3
    assert seen == [1, 2, 3]  # every callback saw the update that stopped the run
    assert latest_checkpoint(out).name == "step_00000003" and (out / "final_model" / "model.safetensors").exists()
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in evals] == [3, 3] and evals[1] == {"step": 3, "epoch": 0, "stopped": "enough at 3"}
    resumed = engine.fit(config.replace(resume="latest"), model=tiny(seed=1), callbacks=[lambda u: seen.append(u)])
    assert resumed["stopped_early"] == "enough at 3" and resumed["steps"] == 3 and seen == [1, 2, 3]
    assert resumed["final"]["f1"] == summary["final"]["f1"]


def test_evaluation_observers_get_every_record_and_can_stop_the_run(tmp_path, tiny):
    records = []
    config = tiny_config(tmp_path, batch_size=4, epochs=2.0, eval_every_steps=2, eval_before_training=True)
    summary = engine.fit(config, model=tiny(), on_evaluate=[records.append])
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [r["step"] for r in logged] and len(records) > 4
    assert records[0]["step"] == 0 and records[-1]["step"] == summary["steps"]  # before training ... the end
    per_epoch = summary["steps"] // 2
    assert [r["step"] for r in records if "train_loss" in r] == [per_epoch, 2 * per_epoch]  # the epoch ends

    def plateau(record):  # early stopping in three lines: no better F1 than two evaluations ago
        f1s = [r["f1"] for r in records]
        if record["step"] >= 4:
            raise engine.StopTraining(f"F1 {f1s[-1]:.1f} at step {record['step']}")

    records.clear()
    stopped = engine.fit(
        config.replace(output_dir=str(tmp_path / "b")), model=tiny(), on_evaluate=[records.append, plateau]
    )
    assert stopped["steps"] == 4 and stopped["stopped_early"].endswith("at step 4")
    assert [r["step"] for r in records] == [0, 2, 4]  # no second evaluation at the update that stopped it


def test_a_stop_without_a_message_names_who_raised_it_and_every_observer_still_sees_the_event():
    seen, state = [], engine.TrainState(step=7)

    def patience(record):
        raise engine.StopTraining()

    engine.notify(
        [patience, seen.append, lambda r: (_ for _ in ()).throw(engine.StopTraining("second"))], {"f1": 1.0}, state
    )
    assert state.stop_reason == "StopTraining from patience" and seen == [{"f1": 1.0}]  # the first reason wins


# ------------------------------------------------------------------------------------ what a library user sees


def test_a_library_user_who_set_up_no_logging_sees_what_the_run_does(tmp_path, tiny, monkeypatch, capsys):
    import logging

    bertqa_logger = logging.getLogger("bertqa")
    monkeypatch.setattr(logging.getLogger(), "handlers", [])  # as in a plain script: nothing configured
    monkeypatch.setattr(bertqa_logger, "handlers", [])
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    engine.fit(tiny_config(tmp_path, save_every_steps=2, save_model=True), model=tiny())
    err = capsys.readouterr().err
    assert "Writing model shards" not in err and hf_logging.get_verbosity() == verbosity  # quiet, then as it was
    assert "loaded " in err and "40 train examples ->" in err and "eval examples ->" in err
    assert "precision " in err and "label self-check" in err and "eval at step" in err
    assert re.search(r"disk: checkpoints about [\d.]+ MiB each \(weights \+ optimizer state\), the newest 2 kept", err)
    assert not bertqa_logger.handlers and bertqa_logger.level == logging.NOTSET  # left as it was found
    configured = logging.StreamHandler()
    monkeypatch.setattr(logging.getLogger(), "handlers", [configured])  # a user's own set-up is theirs
    engine.fit(tiny_config(tmp_path, overwrite=True), model=tiny())
    assert "label self-check" not in capsys.readouterr().err


def test_only_the_main_process_prints_and_all_log_the_runs_mean_loss(monkeypatch):
    import logging

    from bertqa.training import reporting, state

    only_main = reporting.MainProcessOnly()

    def passes(level):
        return only_main.filter(logging.LogRecord("bertqa", level, __file__, 1, "a line", None, None))

    monkeypatch.setenv("RANK", "1")
    assert not passes(logging.INFO) and not passes(logging.WARNING) and passes(logging.ERROR)
    monkeypatch.setenv("RANK", "0")
    assert passes(logging.INFO)
    meter = state.LogMeter("cpu")
    meter.add_batch({"input_ids": torch.zeros(2, 3), "attention_mask": torch.ones(2, 3)})
    meter.add_update(torch.tensor(2.0))
    record = meter.read(step=1, epoch=0, lr=1.0, num_processes=2, reduce=lambda loss: (loss + 4.0) / 2)
    assert record["loss"] == 3.0 and meter.pass_mean() == 3.0  # the mean with another process's 4.0


def test_fit_takes_records_in_the_file_schema_and_holds_out_evaluation_data(tmp_path, tiny, caplog):
    examples, _ = sources.load_examples("dev-v1.1", max_examples=30, seed=5)
    records = as_records(examples)
    summary = engine.fit(
        tiny_config(tmp_path, eval_data=None, max_eval_examples=None), model=tiny(), train_examples=records
    )
    held = summary["final"]["total"]
    assert 0 < held < 30 and summary["label_report"].n_examples == 30 - held
    assert "no evaluation data was given with the training examples" in caplog.text
    bad = [records[0], {"id": "x", "context": "It was 1990.", "answers": {"text": [], "answer_start": []}}]
    with pytest.raises(SquadFormatError, match=r"train_examples: record 1 \(id 'x'\): column 'question' is missing"):
        engine.fit(tiny_config(tmp_path / "bad"), model=tiny(), train_examples=bad)


def test_a_v2_run_without_calibration_ships_the_default_threshold(tmp_path, tiny, caplog):
    import logging

    config = tiny_config(
        tmp_path,
        train_data="dev-v2.0[:20]",
        eval_data="dev-v2.0[20:]",
        save_model=True,
        max_train_examples=60,
        max_eval_examples=20,
        calibration_split=0,
    )
    with caplog.at_level(logging.INFO, logger="bertqa"):
        summary = engine.fit(config, model=tiny())
    meta = json.loads((tmp_path / "run" / "final_model" / "bertqa.json").read_text())
    assert meta["no_answer_threshold"] == summary["final"]["no_answer_threshold"] == 0.0
    assert meta["threshold_calibrated_on"] == {
        "source": "none (calibration_split is 0): the default threshold 0",
        "questions": 0,
    }
    assert (
        "calibration_best_f1" not in summary["final"]
        and "not calibrated (calibration_split is 0): the default 0" in caplog.text
    )


def test_checkpoints_without_the_optimizer_state_are_smaller_and_still_resume(tmp_path, tiny, caplog):
    from bertqa.training.checkpoint import has_optimizer_state

    kwargs = dict(epochs=2.0, batch_size=4, save_every_steps=3, keep_checkpoints=5)

    def crash(update):
        if update.step == 5:
            raise Crash

    for name, keep in (("full", True), ("light", False)):
        with pytest.raises(Crash):
            engine.fit(
                tiny_config(tmp_path / name, save_optimizer_state=keep, **kwargs), model=tiny(), callbacks=[crash]
            )
    full, light = (latest_checkpoint(tmp_path / name / "run") for name in ("full", "light"))
    assert has_optimizer_state(full) and not has_optimizer_state(light)
    size = {folder: sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) for folder in (full, light)}
    assert size[light] < 0.6 * size[full]
    summary = engine.fit(
        tiny_config(tmp_path / "light", resume="latest", save_optimizer_state=False, **kwargs), model=tiny()
    )
    assert summary["steps"] > 5 and "holds no optimizer state" in caplog.text


def test_a_threshold_is_not_chosen_on_too_few_of_either_kind(tmp_path, tiny, caplog):
    """A user's 33 records, 31 answerable and 2 not: the threshold's held-out questions hold no unanswerable one.
    Chosen on them, a threshold said "no answer" to questions whose best span beat "no answer"; the run now uses
    the default and says why."""
    import logging

    from bertqa.loading import load_squad

    answerable, _ = load_squad("dev-v1.1")
    unanswerable = [ex for ex in load_squad("dev-v2.0")[0] if ex.is_impossible][:2]
    records = as_records([*answerable[:31], *unanswerable], ids=True)
    config = tiny_config(tmp_path, save_model=True, eval_data="dev-v2.0[30:]", max_train_examples=None)
    with caplog.at_level(logging.INFO, logger="bertqa"):
        summary = engine.fit(config, model=tiny(), train_examples=records)
    assert "the no-answer threshold is not calibrated (its " in caplog.text
    assert "at least 5 of each are needed): they are trained on" in caplog.text
    meta = json.loads((tmp_path / "run" / "final_model" / "bertqa.json").read_text())
    assert meta["no_answer_threshold"] == summary["final"]["no_answer_threshold"] == 0.0
    assert meta["threshold_calibrated_on"]["questions"] == 0


def test_progress_bars_only_on_a_terminal_and_never_with_tqdm_disable(monkeypatch):
    import io

    from bertqa.inference import progress_bars

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # a file: `2> log`
    assert not progress_bars()
    monkeypatch.setattr(sys, "stderr", Terminal())
    assert progress_bars()
    for value, shown in (("1", False), ("true", False), ("0", True), ("", True)):
        monkeypatch.setenv("TQDM_DISABLE", value)
        assert progress_bars() is shown, value


def test_a_long_evaluation_is_announced_with_its_size_and_time_once(tmp_path, tiny, caplog, monkeypatch):
    from bertqa.training import evaluation

    monkeypatch.setattr(evaluation, "LONG_EVALUATION_WINDOWS", 10)  # the 12 questions here count as long
    config = tiny_config(tmp_path, max_train_examples=2, max_eval_examples=12, max_steps=2, eval_every_steps=1)
    with caplog.at_level(logging.INFO, logger="bertqa"):
        engine.fit(config, model=tiny())
    plans = [r.getMessage() for r in caplog.records if r.getMessage().startswith("each evaluation scores")]
    assert len(plans) == 1 and re.match(
        r"each evaluation scores 12 questions \(\d+ windows\): about [\d.]+ s", plans[0]
    )
    lopsided = [r.getMessage() for r in caplog.records if "times the 2 the run trains on" in r.getMessage()]
    assert len(lopsided) == 1 and "--max-eval-examples" in lopsided[0]


def test_a_short_evaluation_is_not_timed_before_it_runs(tmp_path, tiny, caplog, monkeypatch):
    from bertqa.training import timing

    def untimed(*args, **kwargs):
        raise AssertionError("a short evaluation was timed")

    monkeypatch.setattr(timing, "evaluation_seconds", untimed)
    with caplog.at_level(logging.INFO, logger="bertqa"):
        engine.fit(tiny_config(tmp_path, max_steps=1), model=tiny())
    assert not [r for r in caplog.records if r.getMessage().startswith("each evaluation scores")]
