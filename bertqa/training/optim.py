"""Optimizer and learning-rate schedule, counted in optimizer updates.

The schedule is a function of the update count only, so it is the same for any gradient accumulation and any
number of processes, and it is stepped once per real update: the two mistakes that leave a run at chance (a
schedule stepped per epoch, or per micro-batch on every process) cannot be expressed here.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable

import torch

__all__ = [
    "OptimizerFactory",
    "build_optimizer",
    "build_scheduler",
    "count_updates",
    "describe_groups",
    "evaluations_between",
    "freeze_bottom",
    "fused_adamw_applies",
    "hyperparameters",
    "layer_depths",
    "reschedule",
    "restore_hyperparameters",
]

# `fit(..., optimizer=factory)`: builds the optimizer for the model it is given (the schedule is bertqa's).
OptimizerFactory = Callable[[torch.nn.Module], torch.optim.Optimizer]


def fused_adamw_applies(device_type: str) -> bool:
    """Whether AdamW's fused kernel serves this device: one kernel over all parameters instead of several passes.
    On the 2-core test CPU clipping + AdamW for MiniLM took 16 ms per update fused against 36 ms unfused; it is
    also `transformers.Trainer`'s default optimizer since torch 2.8."""
    return device_type in ("cuda", "cpu")


def build_optimizer(
    model: torch.nn.Module,
    *,
    lr: float,
    weight_decay: float,
    eps: float,
    fused: bool = False,
    layer_lr_decay: float = 1.0,
) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only: biases and LayerNorm weights (dim < 2) are not decayed.

    `layer_lr_decay` below 1 gives each depth its own learning rate (see `layer_depths`): the QA head gets `lr`,
    the top encoder layer `lr * decay`, each layer below it the LR of the one above times `decay`, and the
    embeddings the lowest. Each group keeps its share of the peak as `lr_scale` and its depth's name as `name`.
    """
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if layer_lr_decay == 1.0:
        levels = {"all": (1.0, params)}
    else:
        depths = layer_depths(model)
        top = max(depths.values())
        names = {0: "embeddings", top: "head", **{d: f"layer {d - 1}" for d in range(1, top)}}
        levels = {
            names[d]: (layer_lr_decay ** (top - d), [(n, p) for n, p in params if depths[n] == d])
            for d in range(top + 1)
        }
    groups = []
    for name, (scale, members) in levels.items():
        for decay in (True, False):  # "decay" marks a group whose weight decay follows the setting
            chosen = [p for _, p in members if (p.dim() >= 2) == decay]
            if chosen:
                groups.append(
                    {
                        "params": chosen,
                        "lr": lr * scale,
                        "lr_scale": scale,
                        "name": name,
                        "weight_decay": weight_decay if decay else 0.0,
                        "decay": decay,
                    }
                )
    return torch.optim.AdamW(groups, lr=lr, eps=eps, fused=fused or None)


# Encoder layers are numbered in the parameter names of BERT, RoBERTa, ELECTRA, DeBERTa (encoder.layer.N) and
# DistilBERT (transformer.layer.N); models that share one layer across depths (ALBERT) have no such numbers.
_LAYER = re.compile(r"(?:^|\.)(?:layer|layers)\.(\d+)\.")
_HEADS = ("qa_outputs",)


def layer_depths(
    model: torch.nn.Module, *, setting: str = "layer_lr_decay", off: str = "1.0", frozen: bool = False
) -> dict[str, int]:
    """Each trainable parameter's depth (every parameter's with `frozen`): 0 for the embeddings (and encoder parts
    outside any layer, such as DeBERTa's relative position embeddings, which every layer reads), 1..N for encoder
    layers 0..N-1, N+1 for the QA head. Refuses a model whose parameters it cannot place, naming `setting` and the
    value `off` that turns it off."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad or frozen]
    layers = {n: int(m.group(1)) for n, _ in named if (m := _LAYER.search(n))}
    if not layers:
        raise ValueError(
            f"{setting} cannot layer {type(model).__name__}: none of its parameters is in a numbered encoder layer "
            f"(encoder.layer.N, as in BERT, RoBERTa, ELECTRA, DeBERTa, DistilBERT); set {setting} {off}"
        )
    top = max(layers.values()) + 2
    depths, unplaced = {}, []
    for name, _ in named:
        # torch.compile's, DDP's and peft's wrappers
        bare = name.removeprefix("_orig_mod.").removeprefix("module.").removeprefix("base_model.model.")
        if name in layers:
            depths[name] = layers[name] + 1
        elif bare.startswith(_HEADS):
            depths[name] = top
        elif "embeddings" in bare or ".encoder." in f".{bare}" or "pooler" in bare:
            depths[name] = top - 1 if "pooler" in bare else 0  # a pooler reads the top layer's output
        else:
            unplaced.append(name)
    if unplaced:
        raise ValueError(
            f"{setting} cannot place these parameters of {type(model).__name__} at a depth: "
            f"{', '.join(unplaced[:5])}{' ...' if len(unplaced) > 5 else ''}; set {setting} {off}"
        )
    return depths


def freeze_bottom(model: torch.nn.Module, *, embeddings: bool, layers: int) -> tuple[int, int]:
    """Stop training the embeddings (when `embeddings`) and the lowest `layers` encoder layers: their parameters no
    longer require gradients, so AdamW leaves them as they are (an optimizer built before keeps them in its groups
    and skips them, as it skips any parameter without a gradient) and, with the embeddings frozen as well, autograd
    ends the backward pass at the lowest layer that trains. Returns the trainable and all parameters' counts."""
    setting, off = ("freeze_layers", "0") if layers else ("freeze_embeddings", "false")
    depths = layer_depths(model, setting=setting, off=off, frozen=True)
    top = max(depths.values()) - 1  # the encoder layers are depths 1..top
    if layers > top:
        raise ValueError(f"freeze_layers={layers}: {type(model).__name__} has {top} encoder layers; choose 0 to {top}")
    lowest = 0 if embeddings else 1
    for name, param in model.named_parameters():
        if lowest <= depths[name] <= layers:
            param.requires_grad_(False)
    counts = [(p.numel(), p.requires_grad) for p in model.parameters()]
    return sum(n for n, trains in counts if trains), sum(n for n, _ in counts)


def describe_groups(optimizer: torch.optim.Optimizer) -> str:
    """One line per parameter group: its name, peak LR, weight decay and size (logged once at the start)."""
    lines = []
    for i, group in enumerate(optimizer.param_groups):
        size = sum(p.numel() for p in group["params"])
        lines.append(
            f"  {group.get('name', f'group {i}')}: peak lr {group.get('initial_lr', group['lr']):.3g}, "
            f"weight decay {group.get('weight_decay', 0):g}, {len(group['params'])} tensors, {size:,} "
            "values"
        )
    return "\n".join(lines)


def build_scheduler(
    optimizer: torch.optim.Optimizer, *, total_steps: int, warmup_steps: int, schedule: str = "linear"
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup from 0 to the peak LR over `warmup_steps` updates, then linear/cosine decay to 0 or constant.

    Step it once per optimizer update (not per micro-batch, process or epoch).
    """

    return torch.optim.lr_scheduler.LambdaLR(optimizer, _factor(total_steps, warmup_steps, schedule))


def reschedule(
    scheduler: torch.optim.lr_scheduler.LambdaLR,
    *,
    total_steps: int,
    warmup_steps: int,
    schedule: str = "linear",
    shortened_at: int | None = None,
) -> None:
    """Give a `build_scheduler` schedule a new length where it stands (a time-budget run, once its plan is made):
    from its current update on, every group's LR is what a schedule built for `total_steps` would give.

    `shortened_at` (a run that fell behind its plan and must end sooner): up to that update the schedule is the one
    for `warmup_steps` and the length it had; after it, the LR decays from where it was to 0 at `total_steps`, in
    the schedule's shape, so it never jumps. Give the same values again on resume to get the same schedule.
    """
    factor = _factor(total_steps, warmup_steps, schedule)
    if shortened_at is not None:
        before = scheduler.lr_lambdas[0]
        factor = _tail(before, shortened_at, total_steps, schedule)
    scheduler.lr_lambdas = [factor] * len(scheduler.optimizer.param_groups)
    lrs = [base * factor(scheduler.last_epoch) for base in scheduler.base_lrs]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs  # what get_last_lr() reads until the next step


def _tail(before: Callable[[int], float], at: int, total_steps: int, schedule: str) -> Callable[[int], float]:
    """`before` up to update `at` (and through its warmup); then from its value there down to 0 at `total_steps`."""
    start = at
    level = before(start)

    def factor(step: int) -> float:
        if step <= start or schedule == "constant":
            return before(step) if step <= start else level
        progress = min(1.0, (step - start) / max(1, total_steps - start))
        return level * (0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1.0 - progress)

    return factor


def _factor(total_steps: int, warmup_steps: int, schedule: str) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / max(1, warmup_steps)
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1.0 - progress

    return factor


# What a checkpoint restores into an optimizer that the run's own settings must override when a run is resumed
# with accepted changes (peak LR, weight decay, epsilon), read from the freshly built optimizer.
_HYPERPARAMETERS = ("initial_lr", "weight_decay", "eps")


def hyperparameters(optimizer: torch.optim.Optimizer) -> list[dict[str, float]]:
    """Each group's peak LR, weight decay and epsilon, as built: read it before `Accelerator.load_state`, give it
    back with `restore_hyperparameters` after (the schedule must already be built: it sets `initial_lr`)."""
    return [{k: group[k] for k in _HYPERPARAMETERS if k in group} for group in optimizer.param_groups]


def restore_hyperparameters(
    optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR, saved: list[dict[str, float]]
) -> None:
    """Put back the peak LRs, weight decays and epsilons `hyperparameters` read, keeping the schedule's position.
    A checkpoint restores the hyperparameters it was saved with; a run resumed with accepted changes (another LR,
    layer decay, or optimizer factory) needs its own back."""
    for group, values, factor in zip(optimizer.param_groups, saved, scheduler.lr_lambdas):
        group.update(values)
        group["lr"] = group["initial_lr"] * factor(scheduler.last_epoch)
    scheduler.base_lrs = [group["initial_lr"] for group in optimizer.param_groups]


def count_updates(batches_per_epoch: int, *, grad_accum: int, epochs: float, max_steps: int | None) -> tuple[int, int]:
    """(optimizer updates per epoch, updates in the whole run) for `batches_per_epoch` micro-batches per process.

    An epoch's last, shorter accumulation round is still an update; `max_steps` overrides the epochs.
    """
    per_epoch = math.ceil(batches_per_epoch / grad_accum)
    return per_epoch, max_steps or math.ceil(epochs * per_epoch)


def evaluations_between(done: int, total: int, *, per_epoch: int, eval_every: int | None) -> int:
    """Evaluations a run makes after update `done` up to its end at `total`: one at each epoch end, every
    `eval_every` updates, and the final one (an update that is due for several counts once)."""
    points = {total}
    points |= set(range((done // per_epoch + 1) * per_epoch, total, per_epoch))
    if eval_every:
        points |= set(range((done // eval_every + 1) * eval_every, total, eval_every))
    return len(points)
