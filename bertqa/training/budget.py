"""Training to a time budget: read a duration, time the first updates and an evaluation, plan how many updates fit.

`time_budget="10m"` fixes a run's length by the clock instead of by a count. The run's first `PROBE_UPDATES`
updates (real training) are timed, so is a forward pass over a few evaluation batches (or the evaluation before
training, when there was one), and `plan_steps` picks the largest number of updates such that the training and
every evaluation still to come end within the budget. The learning-rate schedule is then set to span exactly those
updates, so its decay ends at the deadline instead of being cut off: for a fixed wall-clock budget that beats a
fixed-length recipe stopped short (Li, Yumer & Ramanan, "Budgeted Training", ICLR 2020). The training questions
follow the plan: `bertqa.batching.QuestionOrderBatchSampler` takes them whole in a seeded order, so a run that has
time for N questions trains on a seeded draw of N, every window of each.

The arithmetic is pure; `time_forward` and `evaluation_seconds` run a model, `Deadline` reads the clock.
"""

from __future__ import annotations

import collections
import logging
import math
import re
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

__all__ = [
    "PROBE_UPDATES",
    "SAFETY",
    "BudgetPlan",
    "BudgetSpec",
    "BudgetTooSmall",
    "Deadline",
    "evaluation_seconds",
    "evaluations_between",
    "format_duration",
    "make_plan",
    "parse_duration",
    "plan_run",
    "plan_steps",
    "time_forward",
    "update_seconds",
]

logger = logging.getLogger("bertqa")

# Updates timed before the plan; the first is left out of the rate: it pays one-off costs (allocator warm-up, the
# optimizer's state) that later updates do not.
PROBE_UPDATES = 6
# How many of the latest updates' times the deadline's median is taken over.
RECENT = 20
# The plan spends this share of the time left, so that a stretch a little slower than the probe still ends in time.
SAFETY = 0.97

_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0}
_DURATION = re.compile(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m(?:in)?)?(?:(\d+(?:\.\d+)?)s)?")


class BudgetTooSmall(ValueError):
    """The time budget cannot hold the measured warm-up and the evaluations the run must make."""


def parse_duration(value: str | float, *, name: str = "time_budget") -> float:
    """Seconds in a duration: a number of seconds (600, "600", "90s") or hours/minutes/seconds ("10m", "1h30m",
    "1h 30m 15s", "2.5m"). Refused naming the setting and the accepted forms."""
    seconds: float | None = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip().lower().replace(" ", "")
        if re.fullmatch(r"\d+(?:\.\d+)?", text):
            seconds = float(text)
        elif text and (match := _DURATION.fullmatch(text)):
            seconds = sum(float(part) * unit for part, unit in zip(match.groups(), _UNITS.values()) if part)
    if seconds is None or not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(
            f"{name} {value!r} is not a duration: give seconds (600) or hours, minutes and seconds such as 90s, "
            "10m, 1h30m"
        )
    return seconds


def format_duration(seconds: float) -> str:
    """'8 min 5 s', '1 h 2 min', '45 s', '0.4 s': how a person reads a length of time."""
    if seconds < 10:
        return f"{max(0.0, seconds):.1f} s"
    s = round(seconds)
    h, m, s = s // 3600, s % 3600 // 60, s % 60
    if h:
        return f"{h} h {m} min"
    return f"{m} min {s} s" if m else f"{s} s"


def evaluations_between(done: int, total: int, *, per_epoch: int, eval_every: int | None) -> int:
    """Evaluations a run makes after update `done` up to its end at `total`: one at each epoch end, every
    `eval_every` updates, and the final one (an update that is due for several counts once)."""
    points = {total}
    points |= set(range((done // per_epoch + 1) * per_epoch, total, per_epoch))
    if eval_every:
        points |= set(range((done // eval_every + 1) * eval_every, total, eval_every))
    return len(points)


def plan_steps(
    *,
    remaining_s: float,
    s_per_update: float,
    eval_s: float,
    done: int,
    cap: int,
    per_epoch: int,
    eval_every: int | None,
) -> int | None:
    """The largest number of updates T (`done` <= T <= `cap`) for which the updates after `done`, at `s_per_update`
    each, and the evaluations they bring (`evaluations_between`, `eval_s` each) take at most `remaining_s`;
    None when not even stopping at `done`, with its final evaluation, fits."""

    def cost(total: int) -> float:
        evals = evaluations_between(done, total, per_epoch=per_epoch, eval_every=eval_every)
        return (total - done) * s_per_update + evals * eval_s

    if cost(done) > remaining_s:
        return None
    low, high = done, max(done, cap)  # cost rises with T: the last T that fits, by bisection
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if cost(mid) <= remaining_s else (low, mid - 1)
    return low


@dataclass(frozen=True)
class BudgetPlan:
    """What a budget run decided after its timed warm-up; saved in `TrainState` (every checkpoint) and in
    `config.json` (`_budget_plan`), so a resumed run keeps it instead of measuring again."""

    budget_s: float
    spent_s: float  # of the budget, before the plan: the evaluation before training (if any) and the warm-up
    probe_updates: int
    s_per_update: float  # measured over the warm-up, scaled to the mean update of the training data
    eval_s: float  # one evaluation, measured
    total_steps: int  # the run's length now: the plan's, or shorter when the run fell behind it
    warmup_steps: int
    per_epoch: int  # updates in a pass over the questions the run trains on
    evaluations: int  # still to come after the plan, the final one included
    questions: int  # training questions the run reaches (every window of each)
    pool_questions: int  # training questions it could draw from
    passes: float
    expected_s: float  # spent_s plus what the plan predicts for the rest
    precision: str
    planned_steps: int = 0  # the length the plan first chose
    from_step: int = 0  # where the run stood when it was planned (later than 0: planned again on resume)
    shortened: tuple[tuple[int, int], ...] = ()  # (at update, new length) each time the run fell behind

    def __post_init__(self) -> None:
        if not self.planned_steps:
            object.__setattr__(self, "planned_steps", self.total_steps)
        object.__setattr__(self, "shortened", tuple(tuple(pair) for pair in self.shortened))  # from JSON: lists

    def to_dict(self) -> dict[str, Any]:
        """As JSON holds it (lists, not tuples), so that a plan compares equal to the one read back."""
        return {**asdict(self), "shortened": [list(pair) for pair in self.shortened]}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> BudgetPlan:
        return cls(**{f.name: values[f.name] for f in fields(cls) if f.name in values})

    def describe(self) -> str:
        """The plan in a line a person reads at the start of the run."""
        draw = (
            f"{self.questions:,} of {self.pool_questions:,} training questions (a seeded draw, each seen whole)"
            if self.questions < self.pool_questions
            else f"all {self.pool_questions:,} training questions, {self.passes:.2f} passes"
        )
        return (
            f"time budget {format_duration(self.budget_s)}: {self.total_steps} updates ({self.warmup_steps} warmup; "
            f"the LR decays to 0 at the last) at {self.s_per_update:.2f} s each, timed over the last "
            f"{max(1, self.probe_updates - 1)} of {self.probe_updates} warm-up updates in {self.precision}; {draw}; "
            f"{self.evaluations} evaluation{'s' if self.evaluations != 1 else ''} to come (about "
            f"{format_duration(self.eval_s)} each); training and evaluation should take "
            f"{format_duration(self.expected_s)} of the budget"
        )


@dataclass(frozen=True)
class BudgetSpec:
    """A time-budget run's budget and the settings its plan must respect."""

    budget_s: float
    precision: str  # as the plan reports it: bf16, fp32
    grad_accum: int
    warmup_ratio: float
    schedule: str
    eval_every: int | None
    eval_batch_size: int
    pad_to_multiple_of: int


def update_seconds(seconds: float, *, timed: np.ndarray, tokens: np.ndarray, per_epoch: int) -> float:
    """The mean seconds of an update over a whole pass: `seconds` is what the timed updates took, `timed` the padded
    tokens of their micro-batches, `tokens` those of every micro-batch of the pass. The timed updates' rate per
    token, times the mean update's tokens."""
    return seconds / max(1, int(timed.sum())) * float(tokens.sum()) / max(1, per_epoch)


def evaluation_seconds(
    model: torch.nn.Module, loaders: Sequence[Any], *, device: torch.device, batch_size: int, multiple: int
) -> float:
    """One evaluation's seconds over `loaders` (`eval_batches` loaders: the evaluation data and the v2 threshold's),
    from forward passes over the longest, a middle and the shortest batch of each (after an untimed warm-up): the
    seconds per token at those three lengths, interpolated to every batch's length (a long window costs more per
    token: attention grows with the square of the length). About a tenth of an evaluation of 1000 SQuAD questions."""
    from bertqa.batching import SortedBatchSampler, model_inputs, padded_tokens

    total = 0.0
    for loader in loaders:
        dataset = loader.dataset
        batches = list(SortedBatchSampler(dataset.features.lengths, batch_size))
        tokens = padded_tokens(batches, dataset.features.lengths, multiple)
        lengths = tokens / np.array([len(b) for b in batches])  # each batch's padded length
        picks = sorted({0, len(batches) // 2, len(batches) - 1})  # the longest, a middle one, the shortest
        inputs = {k: model_inputs(loader.collate_fn([dataset[i] for i in batches[k]])) for k in picks}
        shortest = inputs[picks[-1]]  # the untimed warm-up before each: cheap
        per_token = [time_forward(model, [inputs[k]], device, warm_up=shortest) / tokens[k] for k in picks]
        order = np.argsort(lengths[picks])
        at = np.interp(lengths, lengths[picks][order], np.array(per_token)[order])
        total += float((tokens * at).sum())
    return total * 1.05  # post-processing and scoring: under 1% of the forward passes on SQuAD, plus the gathers


def make_plan(
    spec: BudgetSpec,
    sampler: Any,
    *,
    spent_s: float,
    s_per_update: float,
    eval_s: float,
    probe: int,
    done: int,
    cap: int,
    per_epoch: int,
    windows_per_update: int,
    first_pass: bool,
    batches_done: int = 0,
    from_step: int = 0,
) -> BudgetPlan:
    """The plan, from the measured rates: the most updates (at most `cap`) that fit the budget left; when they are
    fewer than a pass, the first questions of the `bertqa.batching.QuestionOrderBatchSampler`'s order that fill
    them (a seeded draw, whole), and the run's length becomes one pass over those; never fewer than the questions of
    the pools already trained from (`batches_done` micro-batches into the pass). `sampler` is left as it was."""
    total = plan_steps(remaining_s=(spec.budget_s - spent_s) * SAFETY, s_per_update=s_per_update, eval_s=eval_s,
                       done=done, cap=cap, per_epoch=per_epoch, eval_every=spec.eval_every)  # fmt: skip
    if total is None:
        need = math.ceil((spent_s + eval_s) / SAFETY)
        raise BudgetTooSmall(
            f"time_budget {format_duration(spec.budget_s)} is too small here: the {probe} warm-up updates (and any "
            f"evaluation before them) took {format_duration(spent_s)} and one evaluation takes about "
            f"{format_duration(eval_s)}; the smallest budget that would finish is about {format_duration(need)} "
            f"(time_budget {need}), and a run needs several times that to learn"
        )
    questions = sampler.questions
    if total < per_epoch and first_pass:  # less than a pass: the questions it has time for, whole
        keep = sampler.questions_to_keep(0, batches_done)
        questions = sampler.questions_within(0, total * windows_per_update, at_least=keep)
        windows = sampler.questions_windows(0, questions)
        batches = math.ceil(windows / sampler.batch_size)  # the pass, as Accelerate shares it out and accumulates
        per_process = math.ceil(batches / max(1, windows_per_update // (sampler.batch_size * spec.grad_accum)))
        per_epoch = total = math.ceil(per_process / spec.grad_accum)
    evaluations = evaluations_between(done, total, per_epoch=per_epoch, eval_every=spec.eval_every)
    expected = spent_s + (total - done) * s_per_update + evaluations * eval_s
    if expected > spec.budget_s:  # the questions already trained from are kept whole, even past the budget
        logger.warning("the plan overruns the time budget (%s of %s): the warm-up alone reached that many questions",
                       format_duration(expected), format_duration(spec.budget_s))  # fmt: skip
    return BudgetPlan(
        budget_s=spec.budget_s, spent_s=spent_s, probe_updates=probe, s_per_update=s_per_update, eval_s=eval_s,
        total_steps=total, warmup_steps=round(spec.warmup_ratio * total), per_epoch=per_epoch,
        evaluations=evaluations, questions=questions, pool_questions=sampler.questions, passes=total / per_epoch,
        expected_s=expected, precision=spec.precision, from_step=from_step,
    )  # fmt: skip


def plan_run(
    accelerator: Any,
    order: Any,
    state: Any,
    model: torch.nn.Module,
    one_pass: Any,
    spec: BudgetSpec,
    deadline: Deadline,
    *,
    total_steps: int,
    per_epoch: int,
    eval_s: float,
    eval_loaders: Sequence[Any],
) -> BudgetPlan:
    """Train and time a fresh run's warm-up, time an evaluation (unless `eval_s`, one already timed), and plan.

    `order` is the run's `bertqa.batching.DataOrder` over a `QuestionOrderBatchSampler`, `one_pass(batches,
    max_steps=N)` trains (`bertqa.engine.train_one_epoch` with the run's pieces), `total_steps` and `per_epoch` are
    the run's length before the plan (`epochs` passes over all its questions: the most it may train). Every process
    plans from the same numbers, the slowest process's, so all agree on one plan. The plan is returned, not applied.
    """
    import torch

    from bertqa.batching import padded_tokens

    sampler, start = order.sampler, state.step  # a run given a new budget on resume is planned from where it is
    probe = max(1, min(PROBE_UPDATES, total_steps - start))
    micro = spec.grad_accum * accelerator.num_processes  # micro-batches per update, all processes
    epoch, at = state.epoch, state.batches_done * accelerator.num_processes  # where in the pass's batches it starts
    deadline.stamps.clear()
    t0 = time.perf_counter()
    one_pass(order.batches(accelerator, state), max_steps=start + probe)  # evaluations and saves wait for the plan
    tokens = padded_tokens(sampler.batches(), sampler.lengths, spec.pad_to_multiple_of)  # the probe's pass
    order.end_pass(state)
    # The first update pays one-off costs (allocations, the optimizer's state): the rate comes from the others.
    stamps, skip = [t0, *deadline.stamps], 1 if probe > 1 else 0
    seconds = stamps[-1] - stamps[skip]
    timed = tokens[at + skip * micro : at + probe * micro]
    if state.epoch == epoch and len(timed) == (probe - skip) * micro:
        s_per_update = update_seconds(seconds, timed=timed, tokens=tokens, per_epoch=per_epoch)
    else:  # the warm-up reached the end of a pass: its updates as they came
        s_per_update = seconds / max(1, probe - skip)
    if not eval_s:
        eval_s = evaluation_seconds(model, eval_loaders, device=accelerator.device, batch_size=spec.eval_batch_size,
                                    multiple=spec.pad_to_multiple_of) / accelerator.num_processes  # fmt: skip
    measured = torch.tensor([[s_per_update, eval_s, deadline.used()]], device=accelerator.device)
    s_per_update, eval_s, spent = (float(v) for v in accelerator.gather(measured).max(dim=0).values)
    return make_plan(spec, sampler, spent_s=spent, s_per_update=s_per_update, eval_s=eval_s, probe=probe,
                     done=state.step, cap=total_steps, per_epoch=per_epoch, from_step=start,
                     windows_per_update=micro * sampler.batch_size, first_pass=state.epoch == 0,
                     batches_done=state.batches_done)  # fmt: skip


def time_forward(
    model: torch.nn.Module,
    batches: Sequence[dict[str, torch.Tensor]],
    device: torch.device,
    *,
    warm_up: dict[str, torch.Tensor] | None = None,
) -> float:
    """Seconds that a forward pass in eval mode takes over `batches` (model inputs only), after one untimed pass
    over `warm_up` (default: the first batch); the model's training mode is put back."""
    import torch

    was_training = model.training
    model.eval()

    def run(batch: dict[str, torch.Tensor]) -> None:
        model(**{k: v.to(device) for k, v in batch.items()})

    with torch.no_grad():
        run(warm_up if warm_up is not None else batches[0])
        _sync(device)
        t0 = time.perf_counter()
        for batch in batches:
            run(batch)
        _sync(device)
        elapsed = time.perf_counter() - t0
    model.train(was_training)
    return elapsed


def _sync(device: torch.device) -> None:
    if device.type == "cuda":  # GPU work is queued: only a sync makes a clock reading mean the work is done
        torch.cuda.synchronize(device)


class Deadline:
    """An update callback for a time-budget run: it counts the budget's seconds into the run's `TrainState` (every
    checkpoint saves them, so a resumed run goes on counting) and notes when each warm-up update ended (the plan's
    measurement). Once there is a plan, it keeps the run within the budget on a machine that turns slower than the
    warm-up measured (another job on the same cores, a noisy neighbour): when the median of the last updates
    projects past the budget, `on_shorten(at, total)` shortens the run so that its LR decays to 0 by the deadline;
    when not even the final evaluation would fit after the next update, it ends the run through `StopTraining`.
    `slowest` makes every process decide from the same numbers (several processes: the slowest one's), which is why
    they check only every `check_every` updates."""

    def __init__(
        self,
        state: Any,
        *,
        budget_s: float,
        eval_every: int | None = None,
        slowest: Any = None,
        check_every: int = 1,
        on_shorten: Any = None,
    ) -> None:
        self.state, self.budget_s, self.eval_every, self.check_every = state, budget_s, eval_every, check_every
        self.slowest = slowest or (lambda values: values)
        self.on_shorten = on_shorten
        self.mark = time.perf_counter()
        self.stamps: list[float] = []  # the clock at the end of each update before the plan
        self.recent: collections.deque[float] = collections.deque(maxlen=RECENT)  # seconds of the last updates

    def used(self) -> float:
        """Seconds of the budget used so far: those counted into the state, and those since."""
        now = time.perf_counter()
        self.last_interval = now - self.mark
        self.state.budget_used_s += self.last_interval
        self.mark = now
        return self.state.budget_used_s

    def __call__(self, update: Any) -> None:
        from bertqa.training.state import StopTraining

        used, plan = self.used(), self.state.budget_plan
        if plan is None:
            self.stamps.append(self.mark)
            return
        self.recent.append(self.last_interval)  # the median below passes over the odd one holding an evaluation
        total = plan["total_steps"]
        if update.step >= total or update.step % self.check_every:
            return
        measured = statistics.median(self.recent) if len(self.recent) >= RECENT // 2 else plan["s_per_update"]
        used, rate = self.slowest([used, max(measured, plan["s_per_update"] * 0.5)])
        per_epoch, eval_s, step = plan["per_epoch"], plan["eval_s"], update.step

        def cost(until: int) -> float:  # going on to update `until`, then the evaluations due by then
            return (until - step) * rate + evaluations_between(step, until, per_epoch=per_epoch,
                                                               eval_every=self.eval_every) * eval_s  # fmt: skip

        if used + cost(total) > self.budget_s + rate and len(self.recent) >= RECENT // 2 and self.on_shorten:
            shorter = plan_steps(remaining_s=(self.budget_s - used) * SAFETY, s_per_update=rate, eval_s=eval_s,
                                 done=step, cap=total, per_epoch=per_epoch, eval_every=self.eval_every)  # fmt: skip
            if shorter is not None and step < shorter < total:
                self.on_shorten(step, shorter)
                total = shorter
        nxt = min(step + self.check_every, total)
        if used + cost(nxt) > self.budget_s:
            raise StopTraining(
                f"time budget: {format_duration(used)} of {format_duration(self.budget_s)} used at update "
                f"{step} of {total}, so only the final evaluation still fits (this machine ran slower than "
                f"the {plan['s_per_update']:.2f} s per update measured at the start)"
            )
