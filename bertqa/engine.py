"""The train/eval loop: plain functions on top of Accelerate, and `fit`, which reads the config and wires them up.

Accelerate owns devices, mixed precision, DDP and gradient accumulation. Everything is counted in optimizer updates
("steps"); a micro-batch is one forward pass. Research hooks, lowest rung first: change a config field; pass your
own model/tokenizer/examples to `fit`; pass `compute_loss(model, batch)` and `callbacks` (called after each update);
compose your own loop from `train_one_epoch` and `evaluate`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bertqa.batching import Collator, FeatureDataset, LengthGroupedBatchSampler, eval_loader
from bertqa.data import Example, Features
from bertqa.metrics import squad_v1_scores, squad_v2_scores
from bertqa.postprocess import Prediction, postprocess

__all__ = [
    "NonFiniteLossError",
    "TrainState",
    "Update",
    "build_optimizer",
    "build_scheduler",
    "default_loss",
    "evaluate",
    "fit",
    "predict",
    "prepare_data",
    "score",
    "train_loader",
    "train_one_epoch",
]

logger = logging.getLogger("bertqa")
LossFn = Callable[[torch.nn.Module, dict[str, torch.Tensor]], torch.Tensor]


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite."""


@dataclass
class Update:
    """What callbacks see after each optimizer update. `loss` stays on the device: reading it is a sync point."""

    step: int
    epoch: int
    lr: float
    loss: torch.Tensor


@dataclass
class TrainState:
    """Loop position, saved in every checkpoint so a resumed run continues at the same micro-batch."""

    step: int = 0
    epoch: int = 0
    batches_done: int = 0  # micro-batches of `epoch` already consumed
    best_f1: float = -1.0

    def state_dict(self) -> dict[str, Any]:
        return dict(vars(self))

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)


_NOT_INPUTS = ("feature_index", "start_positions", "end_positions")


def default_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean of the start and end cross-entropy over the real tokens of each window.

    The models' built-in QA loss lets padding positions into the softmax, so the same window would get a different
    loss in a batch padded further; masking them makes the objective independent of how batches are padded.
    """
    out = model(**{k: v for k, v in batch.items() if k not in _NOT_INPUTS})
    padding = batch["attention_mask"] == 0
    losses = [
        torch.nn.functional.cross_entropy(logits.float().masked_fill(padding, -1e9), batch[target])
        for logits, target in ((out.start_logits, "start_positions"), (out.end_logits, "end_positions"))
    ]
    return (losses[0] + losses[1]) / 2


def build_optimizer(
    model: torch.nn.Module, *, lr: float, weight_decay: float, eps: float, fused: bool = False
) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only: biases and LayerNorm weights (dim < 2) are not decayed."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, eps=eps, fused=fused or None)


def build_scheduler(
    optimizer: torch.optim.Optimizer, *, total_steps: int, warmup_steps: int, schedule: str = "linear"
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup from 0 to the peak LR over `warmup_steps` updates, then linear/cosine decay to 0 or constant.

    It is stepped once per optimizer update (not per micro-batch, process or epoch), so the schedule is the same for
    any gradient accumulation and any number of processes.
    """

    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / max(1, warmup_steps)
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1.0 - progress

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def train_one_epoch(
    accelerator: Any,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    loader: Any,
    *,
    state: TrainState,
    max_steps: int,
    max_grad_norm: float = 1.0,
    log_every: int = 10,
    compute_loss: LossFn = default_loss,
    callbacks: Sequence[Callable[[Update], None]] = (),
    on_log: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, float]:
    """One pass over `loader` (or until `max_steps` updates). Returns the mean training loss of the pass.

    The loss is read from the device only every `log_every` updates; that is also where a non-finite loss is caught.
    """
    model.train()
    loss_sum = torch.zeros((), device=accelerator.device)  # update losses summed on the device: no per-step sync
    update_loss = torch.zeros((), device=accelerator.device)
    log_loss, log_updates, log_windows, log_tokens, epoch_losses = 0.0, 0, 0, 0, []
    micro, t_log = 0, time.perf_counter()
    for batch in loader:
        if state.step >= max_steps:
            break
        with accelerator.accumulate(model):
            loss = compute_loss(model, batch)
            accelerator.backward(loss)
            if accelerator.sync_gradients and max_grad_norm > 0:
                accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        state.batches_done += 1
        update_loss += loss.detach()
        micro += 1
        log_windows += batch["input_ids"].shape[0]
        log_tokens += batch["attention_mask"].sum()
        if not accelerator.sync_gradients:
            continue
        if not accelerator.optimizer_step_was_skipped:  # fp16 overflow: keep the schedule in step with real updates
            scheduler.step()
        state.step += 1
        mean_loss = update_loss / micro
        loss_sum += mean_loss
        log_updates += 1
        info = Update(step=state.step, epoch=state.epoch, lr=scheduler.get_last_lr()[0], loss=mean_loss)
        update_loss, micro = torch.zeros((), device=accelerator.device), 0
        if log_updates == log_every or state.step >= max_steps:
            loss_value = loss_sum.item() / log_updates  # the one sync point of the loop
            if not math.isfinite(loss_value):
                raise NonFiniteLossError(
                    f"training loss is {loss_value} around step {state.step} (lr {info.lr:.3g}); lower the learning "
                    "rate, check the data, or use bf16 instead of fp16. Checkpoints saved so far are intact."
                )
            elapsed = time.perf_counter() - t_log
            record = {
                "step": state.step,
                "epoch": state.epoch,
                "loss": loss_value,
                "lr": info.lr,
                "windows_per_s": log_windows * accelerator.num_processes / elapsed,
                "tokens_per_s": float(log_tokens) * accelerator.num_processes / elapsed,
            }
            epoch_losses.append((loss_value, log_updates))
            if on_log is not None:
                on_log(record)
            loss_sum.zero_()
            log_loss, log_updates, log_windows, log_tokens, t_log = loss_value, 0, 0, 0, time.perf_counter()
        for callback in callbacks:
            callback(info)
    total = sum(n for _, n in epoch_losses)
    mean = sum(v * n for v, n in epoch_losses) / total if total else log_loss
    return {"train_loss": mean}


@torch.no_grad()
def predict(
    accelerator: Any,
    model: torch.nn.Module,
    features: Features,
    *,
    batch_size: int,
    pad_token_id: int,
    pad_to_multiple_of: int = 8,
) -> tuple[np.ndarray, np.ndarray]:
    """Start/end logits of every window, in the order of `features`, gathered from all processes.

    Batches run longest first (least padding); each process returns its windows' logits with their feature
    indices, and the gathered rows are written to their index, so duplicates from uneven sharding fall away.
    """
    loader = eval_loader(
        features, batch_size=batch_size, pad_token_id=pad_token_id, pad_to_multiple_of=pad_to_multiple_of
    )
    # The module-level function, not accelerator.prepare: a prepared loader would be registered for checkpointing.
    from accelerate.data_loader import prepare_data_loader

    loader = prepare_data_loader(
        loader,
        accelerator.device,
        num_processes=accelerator.num_processes,
        process_index=accelerator.process_index,
        put_on_device=True,
    )
    width = int(features.lengths.max())
    start = np.full((len(features), width), -1e4, dtype=np.float32)
    end = np.full((len(features), width), -1e4, dtype=np.float32)
    was_training = model.training
    model.eval()
    for batch in loader:
        index = batch["feature_index"]
        out = model(**{k: v for k, v in batch.items() if k not in _NOT_INPUTS})
        # One width for every batch so they can be gathered across processes (a negative pad crops the
        # multiple-of-8 padding that can reach past the longest window).
        logits = torch.stack([out.start_logits, out.end_logits], dim=1).float()
        logits = torch.nn.functional.pad(logits, (0, width - logits.shape[-1]), value=-1e4)
        logits = accelerator.pad_across_processes(logits, dim=0)
        index = accelerator.pad_across_processes(index, dim=0, pad_index=-1)
        logits, index = accelerator.gather((logits, index))
        keep = (index >= 0).cpu().numpy()
        index, logits = index.cpu().numpy()[keep], logits.cpu().numpy()[keep]
        start[index], end[index] = logits[:, 0], logits[:, 1]
    model.train(was_training)
    return start, end


def score(
    examples: Sequence[Example], predictions: dict[str, Prediction], *, v2: bool, threshold: float = 0.0
) -> dict[str, float]:
    """Official EM/F1 for the examples. v2: spans vs no-answer at `threshold`, plus the best-threshold search."""
    golds = {ex.id: list(ex.answer_texts) for ex in examples if ex.id in predictions}
    if not v2:
        return squad_v1_scores({q: p.text for q, p in predictions.items()}, golds)
    spans = {q: p.text for q, p in predictions.items()}
    na = {q: p.no_answer_score for q, p in predictions.items()}
    return squad_v2_scores(spans, golds, na, threshold=threshold)


def evaluate(
    accelerator: Any,
    model: torch.nn.Module,
    examples: Sequence[Example],
    features: Features,
    *,
    v2: bool,
    batch_size: int,
    pad_token_id: int,
    max_answer_length: int = 30,
    threshold: float = 0.0,
    pad_to_multiple_of: int = 8,
) -> tuple[dict[str, float], dict[str, Prediction]]:
    """Predict every window, post-process and score once on the main process, and share the metrics with all."""
    t0 = time.perf_counter()
    start, end = predict(
        accelerator,
        model,
        features,
        batch_size=batch_size,
        pad_token_id=pad_token_id,
        pad_to_multiple_of=pad_to_multiple_of,
    )
    t1 = time.perf_counter()
    metrics: dict[str, float] = {}
    predictions: dict[str, Prediction] = {}
    if accelerator.is_main_process:
        predictions = postprocess(examples, features, start, end, max_answer_length=max_answer_length)
        metrics = score(examples, predictions, v2=v2, threshold=threshold)
        metrics.update(eval_predict_s=t1 - t0, eval_postprocess_s=time.perf_counter() - t1)
    from accelerate.utils import broadcast_object_list

    metrics = broadcast_object_list([metrics])[0]
    return metrics, predictions


# ------------------------------------------------------------------------------------------------------------- fit


def resolve_precision(mode: str) -> str:
    """ "auto" -> bf16 on GPUs that support it, otherwise full precision (fp16 only when asked for)."""
    if mode != "auto":
        return mode
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def train_loader(
    features: Features,
    *,
    batch_size: int,
    seed: int,
    group_by_length: bool,
    pad_token_id: int,
    pad_to_multiple_of: int = 8,
    num_workers: int = 0,
) -> tuple[torch.utils.data.DataLoader, LengthGroupedBatchSampler]:
    """The training DataLoader and its batch sampler (whose epoch the caller sets before each pass)."""
    sampler = LengthGroupedBatchSampler(features.lengths, batch_size, seed=seed, group_by_length=group_by_length)
    loader = torch.utils.data.DataLoader(
        FeatureDataset(features),
        batch_sampler=sampler,
        collate_fn=Collator(pad_token_id, pad_to_multiple_of),
        num_workers=num_workers,
        generator=torch.Generator().manual_seed(seed),  # keeps loader start-up off the global RNG (resume)
    )
    return loader, sampler


def prepare_data(
    c: Any,
    tokenizer: Any,
    *,
    train_examples: Sequence[Example] | None = None,
    eval_examples: Sequence[Example] | None = None,
) -> tuple[Sequence[Example], Sequence[Example], Features, Features]:
    """The examples and windows that config `c` (a `TrainConfig`) trains and evaluates on; given examples are kept.

    `fit` and the Trainer baseline script both call this, so the two can only ever see the same data.
    """
    from bertqa.cache import cached_features
    from bertqa.data import load_examples

    window = {"max_seq_length": c.max_seq_length, "doc_stride": c.doc_stride, "max_query_length": c.max_query_length}
    prep = {**window, "cache_dir": c.cache_dir, "num_proc": c.tokenize_workers}
    if train_examples is None:
        train_examples, _ = load_examples(
            c.train_data, answerable=c.answerable_only, max_examples=c.max_train_examples, seed=c.seed
        )
    if eval_examples is None:
        eval_examples, _ = load_examples(
            c.eval_data, answerable=c.answerable_only, max_examples=c.max_eval_examples, seed=c.seed
        )
    train_features = cached_features(train_examples, tokenizer, labelled=True, **prep)
    eval_features = cached_features(eval_examples, tokenizer, labelled=False, **prep)
    return train_examples, eval_examples, train_features, eval_features


def make_accelerator(**kwargs: Any) -> Any:
    """An Accelerator; several processes without a GPU (torchrun, `accelerate launch --multi_gpu` on a CPU machine)
    become CPU data parallelism over gloo instead of silently running as independent single processes."""
    import os

    from accelerate import Accelerator

    multi_process = int(os.environ.get("WORLD_SIZE", "1")) > 1
    return Accelerator(cpu=multi_process and not torch.cuda.is_available(), **kwargs)


def fit(
    config: Any,
    *,
    model: torch.nn.Module | None = None,
    tokenizer: Any = None,
    train_examples: Sequence[Example] | None = None,
    eval_examples: Sequence[Example] | None = None,
    compute_loss: LossFn = default_loss,
    callbacks: Sequence[Callable[[Update], None]] = (),
) -> dict[str, Any]:
    """Train and evaluate as `config` (a `bertqa.config.TrainConfig`) says; return a summary of the run.

    Anything passed in replaces what the config would build: your own model, tokenizer or examples.
    """
    from accelerate.utils import set_seed

    from bertqa import checkpoint, reporting
    from bertqa.data import check_labels
    from bertqa.model import build_model, build_tokenizer

    c = config
    out = Path(c.output_dir)
    resume_from = checkpoint.resolve_resume(c.resume, out)
    if resume_from is None and checkpoint.latest_checkpoint(out) is not None:
        raise ValueError(
            f"{out} already holds checkpoints of an earlier run; resume it with resume='latest' (--resume latest) "
            "or choose another output_dir"
        )
    accelerator = make_accelerator(
        mixed_precision=resolve_precision(c.mixed_precision),
        gradient_accumulation_steps=c.grad_accum,
        log_with=list(c.report_to) or None,
        project_dir=str(out),
        step_scheduler_with_optimizer=False,
    )
    set_seed(c.seed)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = c.tf32
    tokenizer = tokenizer if tokenizer is not None else build_tokenizer(c.model)
    window = {"max_seq_length": c.max_seq_length, "doc_stride": c.doc_stride, "max_query_length": c.max_query_length}
    with accelerator.main_process_first():  # the main process fills the window cache, the others read it
        train_examples, eval_examples, train_features, eval_features = prepare_data(
            c, tokenizer, train_examples=train_examples, eval_examples=eval_examples
        )
        label_report = check_labels(train_features, train_examples, min_match_rate=c.label_check_min)
    v2 = any(ex.is_impossible for ex in eval_examples)
    if model is None:
        model = build_model(c.model, attn_implementation=c.attn_implementation)
    if c.compile:
        model = torch.compile(model, dynamic=True)

    loader, sampler = train_loader(
        train_features,
        batch_size=c.batch_size,
        seed=c.seed,
        group_by_length=c.group_by_length,
        pad_token_id=tokenizer.pad_token_id,
        pad_to_multiple_of=c.pad_to_multiple_of,
        num_workers=c.num_workers,
    )
    optimizer = build_optimizer(
        model, lr=c.lr, weight_decay=c.weight_decay, eps=c.adam_eps, fused=accelerator.device.type == "cuda"
    )
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    updates_per_epoch = math.ceil(len(loader) / c.grad_accum)
    total_steps = c.max_steps or math.ceil(c.epochs * updates_per_epoch)
    warmup_steps = round(c.warmup_ratio * total_steps)
    scheduler = build_scheduler(optimizer, total_steps=total_steps, warmup_steps=warmup_steps, schedule=c.schedule)
    state = TrainState()
    accelerator.register_for_checkpointing(scheduler, state)

    train_log, eval_log = out / "train_log.jsonl", out / "metrics.jsonl"
    if resume_from is not None:
        accelerator.load_state(str(resume_from))
        logger.info("resumed from %s at step %d (epoch %d, micro-batch %d)", *(resume_from, state.step),
                    *(state.epoch, state.batches_done))  # fmt: skip
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        c.save(out / "config.json")
        for log in (train_log, eval_log):
            reporting.truncate_jsonl(log, state.step) if resume_from else log.unlink(missing_ok=True)
    accelerator.init_trackers("bertqa", config={k: str(v) for k, v in c.to_dict().items()})
    logger.info("label self-check:\n%s", label_report.format())
    # The derived values, once: what the run will really do.
    logger.info(
        "%d train examples -> %d windows; %d eval examples -> %d windows (%s); %d processes on %s, precision %s; "
        "effective batch %d windows; %d updates (%d per epoch, %d warmup)",
        *(len(train_examples), len(train_features), len(eval_examples), len(eval_features), "v2.0" if v2 else "v1.1"),
        *(accelerator.num_processes, accelerator.device, accelerator.mixed_precision),
        *(c.batch_size * c.grad_accum * accelerator.num_processes, total_steps, updates_per_epoch, warmup_steps),
    )

    meta = {**window, "max_answer_length": c.max_answer_length, "v2": v2}
    bar = _progress(accelerator, total_steps, state.step)

    def run_eval() -> dict[str, float]:
        metrics, _ = evaluate(
            accelerator, model, eval_examples, eval_features, v2=v2, batch_size=c.eval_batch_size,
            pad_token_id=tokenizer.pad_token_id, max_answer_length=c.max_answer_length,
            pad_to_multiple_of=c.pad_to_multiple_of,
        )  # fmt: skip
        record = {"step": state.step, "epoch": state.epoch, **metrics}
        logger.info("eval at step %d: %s", state.step, _fmt(metrics))
        accelerator.log({f"eval/{k}": v for k, v in metrics.items()}, step=state.step)
        if accelerator.is_main_process:
            reporting.append_jsonl(eval_log, record)
        if c.save_model and metrics["f1"] > state.best_f1:
            checkpoint.save_model(accelerator, model, tokenizer, out / "best_model", {**meta, "eval": record})
        state.best_f1 = max(state.best_f1, metrics["f1"])
        return record

    def on_log(record: dict[str, Any]) -> None:
        bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.2e}", win_s=f"{record['windows_per_s']:.1f}")
        accelerator.log({f"train/{k}": v for k, v in record.items() if k != "step"}, step=record["step"])
        if accelerator.is_main_process:
            reporting.append_jsonl(train_log, record)

    def periodic(update: Update) -> None:
        bar.update(1)
        if c.eval_every_steps and update.step % c.eval_every_steps == 0 and update.step < total_steps:
            run_eval()
            model.train()
        if c.save_every_steps and update.step % c.save_every_steps == 0:
            if not torch.isfinite(update.loss):  # never let a NaN step overwrite good checkpoints
                raise NonFiniteLossError(f"training loss is {update.loss.item()} at step {update.step}")
            checkpoint.save_checkpoint(accelerator, out, update.step, keep=c.keep_checkpoints)

    last_eval: dict[str, Any] = {}
    t_start, train_time = time.perf_counter(), 0.0
    if c.eval_before_training and state.step == 0:
        run_eval()
    while state.step < total_steps:
        epoch_loader = accelerator.skip_first_batches(loader, state.batches_done) if state.batches_done else loader
        # Both: Accelerate's loader re-seeds the sampler from its own pass counter, which a resumed run does not share.
        sampler.set_epoch(state.epoch)
        epoch_loader.set_epoch(state.epoch)
        t0 = time.perf_counter()
        train_one_epoch(
            accelerator, model, optimizer, scheduler, epoch_loader, state=state, max_steps=total_steps,
            max_grad_norm=c.max_grad_norm, log_every=c.log_every, compute_loss=compute_loss,
            callbacks=[periodic, *callbacks], on_log=on_log,
        )  # fmt: skip
        train_time += time.perf_counter() - t0
        if state.batches_done >= len(loader):  # a whole epoch: the next run starts on the next one
            state.epoch, state.batches_done = state.epoch + 1, 0
        last_eval = run_eval()
        checkpoint.save_checkpoint(accelerator, out, state.step, keep=c.keep_checkpoints)
    bar.close()
    if not last_eval or last_eval["step"] != state.step:  # resumed after the final checkpoint
        last_eval = run_eval()
    if c.save_model:
        checkpoint.save_model(accelerator, model, tokenizer, out / "final_model", {**meta, "eval": last_eval})
    if accelerator.is_main_process:
        reporting.plot_curves(train_log, eval_log, out / "training_curves.png", title=f"bertqa: {c.model}")
    accelerator.end_training()
    return {
        "steps": state.step,
        "epochs_done": state.epoch,
        "train_time_s": train_time,
        "wall_time_s": time.perf_counter() - t_start,
        "final": last_eval,
        "best_f1": state.best_f1,
        "label_report": label_report,
        "output_dir": str(out),
    }


def _progress(accelerator: Any, total: int, initial: int) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="upd", disable=not accelerator.is_main_process)


def _fmt(metrics: dict[str, float]) -> str:
    keys = ("exact", "f1", "HasAns_f1", "NoAns_f1", "best_f1", "best_f1_thresh")
    return " ".join(f"{k}={metrics[k]:.2f}" for k in keys if k in metrics)
