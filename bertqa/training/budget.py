"""Training to a time budget: read a duration, time the first updates and an evaluation, plan how many updates fit.

`time_budget="10m"` fixes a run's length by the clock instead of by a count. The run's first `PROBE_UPDATES`
updates (real training) are timed, so is a forward pass over a few evaluation batches (or the evaluation before
training, when there was one), and `plan_steps` picks the largest number of updates such that the training and
every evaluation still to come end within the budget. The learning-rate schedule is then set to span exactly those
updates, so its decay ends at the deadline instead of being cut off: for a fixed wall-clock budget that beats a
fixed-length recipe stopped short (Li, Yumer & Ramanan, "Budgeted Training", ICLR 2020). The training questions
follow the plan: `bertqa.batching.QuestionOrderBatchSampler` takes them whole in a seeded order, so a run that has
time for N questions trains on a seeded draw of N, every window of each.

The arithmetic is pure; `bertqa.training.timing` runs a model to time it, `Deadline` reads the clock.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any

import numpy as np

from bertqa.config import format_duration, parse_duration
from bertqa.training.hooks import Hook, count_evaluations
from bertqa.training.optim import evaluations_between, freeze_bottom, reschedule
from bertqa.training.state import StopTraining
from bertqa.training.timing import evaluation_seconds, time_forward

if TYPE_CHECKING:
    import torch

__all__ = [
    "PROBE_UPDATES",
    "SAFETY",
    "BudgetPlan",
    "BudgetSpec",
    "BudgetTooSmall",
    "Deadline",
    "TimeBudget",
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
# How many of the latest updates' times the deadline's rate is taken over: batches of similar length come in pools
# (`bertqa.batching`), so a few updates' times swing by tens of percent; a hundred span about two pools. The run is
# planned again at most once per half of that.
RECENT = 100
# The plan spends this share of the time left, so that a stretch a little slower than the probe still ends in time.
SAFETY = 0.97
# A run with time for part of the questions draws this many more updates' worth of them than it plans: the pass's
# last batches, reached only when the machine turns faster than the warm-up measured (the run is then lengthened).
RESERVE = 0.15
# Once the run is under way, it is lengthened when its updates so far project an end this share of the time left
# earlier than a plan would aim at (SAFETY), by at least LENGTHEN_MIN of its length (and shortened when they project
# one past the budget): between the two, the plan stands.
LENGTHEN_MARGIN = 0.04
LENGTHEN_MIN = 0.02


class BudgetTooSmall(ValueError):
    """The time budget cannot hold the measured warm-up and the evaluations the run must make."""


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
    # (at update, new length) each time the run was planned again as it went: shorter when it fell behind, longer
    # when it ran faster than planned
    replanned: tuple[tuple[int, int], ...] = ()
    cap_steps: int = 0  # the most updates it may be lengthened to (its pass with the reserve; 0: never)
    # A short run made cheaper: the embeddings and this many of the lowest layers frozen after the first warm-up,
    # when that warm-up's plan had `unfrozen_steps` updates (fewer than the spec's freeze_below); then timed again.
    frozen_layers: int | None = None
    unfrozen_steps: int = 0

    def __post_init__(self) -> None:
        if not self.planned_steps:
            object.__setattr__(self, "planned_steps", self.total_steps)
        object.__setattr__(self, "replanned", tuple(tuple(pair) for pair in self.replanned))  # from JSON: lists

    def to_dict(self) -> dict[str, Any]:
        """As JSON holds it (lists, not tuples), so that a plan compares equal to the one read back."""
        return {**asdict(self), "replanned": [list(pair) for pair in self.replanned]}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> BudgetPlan:
        values = {"replanned": values.get("shortened", ()), **values}  # as plans saved before lengthening named it
        return cls(**{f.name: values[f.name] for f in fields(cls) if f.name in values})

    def describe(self) -> str:
        """The plan in a line a person reads at the start of the run."""
        reserve = (
            f", the last {self.per_epoch - self.total_steps} updates of its pass a reserve for a machine that turns "
            "faster"
            if self.total_steps < self.per_epoch
            else ", each seen whole"
        )
        draw = (
            f"{self.questions:,} of {self.pool_questions:,} training questions (a seeded draw{reserve})"
            if self.questions < self.pool_questions
            else f"all {self.pool_questions:,} training questions, {self.passes:.2f} passes"
        )
        cheaper = (
            f"a short run here ({self.unfrozen_steps} updates would fit with every layer training), so the "
            f"embeddings and the lowest {self.frozen_layers} layers are frozen: no backward pass through them; "
            if self.frozen_layers is not None
            else ""
        )
        return (
            f"time budget {format_duration(self.budget_s)}: {cheaper}{self.total_steps} updates "
            f"({self.warmup_steps} warmup; the LR decays to 0 at the last) at {self.s_per_update:.2f} s each, "
            f"timed over the last {max(1, self.probe_updates - 1)} of {self.probe_updates} warm-up updates in "
            f"{self.precision}; {draw}; {self.evaluations} evaluation{'s' if self.evaluations != 1 else ''} to "
            f"come (about {format_duration(self.eval_s)} each); training and evaluation should take "
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
    freeze_below: int = 0  # a plan with fewer updates than this freezes the bottom and plans again (0: never)
    freeze_layers: int = 0  # how many of the lowest encoder layers it then freezes, beside the embeddings


def update_seconds(seconds: float, *, timed: np.ndarray, tokens: np.ndarray, per_epoch: int) -> float:
    """The mean seconds of an update over a whole pass: `seconds` is what the timed updates took, `timed` the padded
    tokens of their micro-batches, `tokens` those of every micro-batch of the pass. The timed updates' rate per
    token, times the mean update's tokens."""
    return seconds / max(1, int(timed.sum())) * float(tokens.sum()) / max(1, per_epoch)


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
    them and `RESERVE` more (a seeded draw, whole), never fewer than the questions of the pools already trained from
    (`batches_done` micro-batches into the pass): a pass over those is the most the run may be lengthened to. The
    plan is the updates that fit. `sampler` is left as it was."""
    total = plan_steps(
        remaining_s=(spec.budget_s - spent_s) * SAFETY,
        s_per_update=s_per_update,
        eval_s=eval_s,
        done=done,
        cap=cap,
        per_epoch=per_epoch,
        eval_every=spec.eval_every,
    )
    if total is None:
        raise _too_small(spec, probe=probe, spent_s=spent_s, eval_s=eval_s)
    questions = sampler.questions
    if total < per_epoch and first_pass:  # less than a pass: the questions it has time for and a reserve, whole
        drawn = min(per_epoch, math.ceil(total * (1 + RESERVE)))
        questions, per_epoch = _first_questions(sampler, spec, drawn, windows_per_update, batches_done)
        total = min(total, per_epoch)  # whole questions may fill a little less than asked for
    evaluations = evaluations_between(done, total, per_epoch=per_epoch, eval_every=spec.eval_every)
    expected = spent_s + (total - done) * s_per_update + evaluations * eval_s
    return BudgetPlan(
        budget_s=spec.budget_s,
        spent_s=spent_s,
        probe_updates=probe,
        s_per_update=s_per_update,
        eval_s=eval_s,
        total_steps=total,
        warmup_steps=round(spec.warmup_ratio * total),
        per_epoch=per_epoch,
        evaluations=evaluations,
        questions=questions,
        pool_questions=sampler.questions,
        passes=total / per_epoch,
        expected_s=expected,
        precision=spec.precision,
        from_step=from_step,
        cap_steps=max(cap, total) if questions == sampler.questions else per_epoch,
    )


def _too_small(spec: BudgetSpec, *, probe: int, spent_s: float, eval_s: float) -> BudgetTooSmall:
    need = math.ceil((spent_s + eval_s) / SAFETY)
    return BudgetTooSmall(
        f"time_budget {format_duration(spec.budget_s)} is too small here: the {probe} warm-up updates (and any "
        f"evaluation before them) took {format_duration(spent_s)} and one evaluation takes about "
        f"{format_duration(eval_s)}; the smallest budget that would finish is about {format_duration(need)} "
        f"(time_budget {need}), and a run needs several times that to learn"
    )


def _first_questions(
    sampler: Any, spec: BudgetSpec, total: int, windows_per_update: int, batches_done: int
) -> tuple[int, int]:
    """A run with time for `total` updates, less than a pass: the first questions of the sampler's order that fill
    them (never fewer than those already trained from), and the updates of one pass over those."""
    keep = sampler.questions_to_keep(0, batches_done)
    questions = sampler.questions_within(0, total * windows_per_update, at_least=keep)
    windows = sampler.questions_windows(0, questions)
    batches = math.ceil(windows / sampler.batch_size)  # the pass, as Accelerate shares it out and accumulates
    per_process = math.ceil(batches / max(1, windows_per_update // (sampler.batch_size * spec.grad_accum)))
    return questions, math.ceil(per_process / spec.grad_accum)


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

    sampler, start = order.sampler, state.step  # a run given a new budget on resume is planned from where it is
    probe = max(1, min(PROBE_UPDATES, total_steps - start))
    micro = spec.grad_accum * accelerator.num_processes  # micro-batches per update, all processes
    s_per_update = _time_warmup(accelerator, order, state, one_pass, spec, deadline, probe=probe, per_epoch=per_epoch)
    if not eval_s:
        device, multiple = accelerator.device, spec.pad_to_multiple_of
        eval_s = evaluation_seconds(
            model, eval_loaders, device=device, batch_size=spec.eval_batch_size, multiple=multiple
        )
        eval_s /= accelerator.num_processes
    measured = torch.tensor([[s_per_update, eval_s, deadline.used()]], device=accelerator.device)
    s_per_update, eval_s, spent = (float(v) for v in accelerator.gather(measured).max(dim=0).values)
    return make_plan(
        spec,
        sampler,
        spent_s=spent,
        s_per_update=s_per_update,
        eval_s=eval_s,
        probe=probe,
        done=state.step,
        cap=total_steps,
        per_epoch=per_epoch,
        from_step=start,
        windows_per_update=micro * sampler.batch_size,
        first_pass=state.epoch == 0,
        batches_done=state.batches_done,
    )


def _time_warmup(
    accelerator: Any,
    order: Any,
    state: Any,
    one_pass: Any,
    spec: BudgetSpec,
    deadline: Deadline,
    *,
    probe: int,
    per_epoch: int,
) -> float:
    """Train the `probe` warm-up updates and return the mean seconds of an update over a whole pass."""
    from bertqa.batching import padded_tokens

    micro = spec.grad_accum * accelerator.num_processes  # micro-batches per update, all processes
    epoch, at = state.epoch, state.batches_done * accelerator.num_processes  # where in the pass's batches it starts
    deadline.stamps.clear()
    t0 = time.perf_counter()
    one_pass(order.batches(accelerator, state), max_steps=state.step + probe)  # evaluations and saves wait
    tokens = padded_tokens(order.sampler.batches(), order.sampler.lengths, spec.pad_to_multiple_of)  # the probe's pass
    order.end_pass(state)
    # The first update pays one-off costs (allocations, the optimizer's state): the rate comes from the others.
    stamps, skip = [t0, *deadline.stamps], 1 if probe > 1 else 0
    seconds = stamps[-1] - stamps[skip]
    timed = tokens[at + skip * micro : at + probe * micro]
    if state.epoch == epoch and len(timed) == (probe - skip) * micro:
        return update_seconds(seconds, timed=timed, tokens=tokens, per_epoch=per_epoch)
    return seconds / max(1, probe - skip)  # the warm-up reached the end of a pass: its updates as they came


def typical(seconds: Sequence[float]) -> float:
    """The mean update time, the slowest 5% left out: an update that also held an evaluation or a checkpoint."""
    kept = sorted(seconds)[: max(1, len(seconds) - len(seconds) // 20)]
    return sum(kept) / len(kept)


class Deadline:
    """An update callback for a time-budget run: it counts the budget's seconds into the run's `TrainState` (every
    checkpoint saves them, so a resumed run goes on counting) and notes when each warm-up update ended (the plan's
    measurement). Once there is a plan, it keeps the run within the budget on a machine that turns slower than the
    warm-up measured (another job on the same cores, a noisy neighbour): when the typical time of its last updates
    projects past the budget, `on_replan(at, total)` shortens the run so that its LR decays to 0 by the deadline;
    when not even the final evaluation would fit after the next update, it ends the run through `StopTraining`. On
    a machine that turns faster (a run's first updates are often slower than the rest, or a neighbour went quiet)
    it lengthens the run, after its warm-up, up to the plan's `cap_steps`, when they project an end more than
    `LENGTHEN_MARGIN` of the time left before what a plan aims at, by `LENGTHEN_MIN` of its length at least.
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
        on_replan: Any = None,
    ) -> None:
        self.state, self.budget_s, self.eval_every, self.check_every = state, budget_s, eval_every, check_every
        self.slowest = slowest or (lambda values: values)
        self.on_replan = on_replan
        self.mark = time.perf_counter()
        self.stamps: list[float] = []  # the clock at the end of each update before the plan
        self.recent: collections.deque[float] = collections.deque(maxlen=RECENT)  # seconds of the last updates
        self.replanned_at = -RECENT  # the update the run was last planned again at

    @staticmethod
    def _least(total: int) -> int:
        """The fewest updates a run of `total` is lengthened by: a few more are not worth a new schedule."""
        return max(2, math.ceil(LENGTHEN_MIN * total))

    def used(self) -> float:
        """Seconds of the budget used so far: those counted into the state, and those since."""
        now = time.perf_counter()
        self.last_interval = now - self.mark
        self.state.budget_used_s += self.last_interval
        self.mark = now
        return self.state.budget_used_s

    def __call__(self, update: Any) -> None:
        used, plan = self.used(), self.state.budget_plan
        if plan is None:
            self.stamps.append(self.mark)
            return
        self.recent.append(self.last_interval)
        total = plan["total_steps"]
        if update.step >= total or update.step % self.check_every:
            return
        measured = typical(self.recent) if len(self.recent) >= RECENT // 2 else plan["s_per_update"]
        used, rate = self.slowest([used, max(measured, plan["s_per_update"] * 0.5)])
        per_epoch, eval_s, step = plan["per_epoch"], plan["eval_s"], update.step

        def cost(until: int) -> float:  # going on to update `until`, then the evaluations due by then
            return (until - step) * rate + evaluations_between(
                step, until, per_epoch=per_epoch, eval_every=self.eval_every
            ) * eval_s

        since = step - self.replanned_at
        steady = len(self.recent) >= RECENT // 2 and since >= RECENT // 2 and self.on_replan is not None
        behind = used + cost(total) > self.budget_s + rate
        cap = plan.get("cap_steps", 0)
        ahead = cost(total) < (self.budget_s - used) * (SAFETY - LENGTHEN_MARGIN) and total < cap
        if steady and (behind or (ahead and step >= plan.get("warmup_steps", 0))):
            length = plan_steps(
                remaining_s=(self.budget_s - used) * SAFETY,
                s_per_update=rate,
                eval_s=eval_s,
                done=step,
                cap=total if behind else cap,
                per_epoch=per_epoch,
                eval_every=self.eval_every,
            )
            if length is not None and step < length != total and (behind or length >= total + self._least(total)):
                self.on_replan(step, length)
                self.replanned_at = step
                total = length
        nxt = min(step + self.check_every, total)
        if used + cost(nxt) > self.budget_s:
            raise StopTraining(
                f"time budget: {format_duration(used)} of {format_duration(self.budget_s)} used at update "
                f"{step} of {total}, so only the final evaluation still fits (the last updates took {rate:.2f} s "
                f"each; {plan['s_per_update']:.2f} s were measured at the start)"
            )


class TimeBudget(Hook):
    """A time-budget run, as a hook: it times the first updates and an evaluation, plans the run to end within the
    budget (`plan_run`), keeps it there (`Deadline`: shortened, or stopped, on a machine that turns slower,
    lengthened on one that turns faster), and on resume keeps the plan it made, or plans again from where it stands
    when the budget was changed.

    The plan goes into the run's state and into `run.record` (config.json and every checkpoint), so a resumed run
    has the same length, questions and schedule. The budget's seconds are counted into `TrainState` as each
    checkpoint is written."""

    def __init__(
        self,
        state: Any,
        spec: BudgetSpec,
        *,
        slowest: Any,
        check_every: int,
        patience: int | None,
        eval_first: bool,
    ) -> None:
        self.spec, self.patience, self.eval_first = spec, patience, eval_first
        self.deadline = Deadline(
            state, budget_s=spec.budget_s, eval_every=spec.eval_every, slowest=slowest, check_every=check_every
        )

    def on_resume(self, run: Any, checkpoint: Any) -> None:
        saved = run.state.budget_plan
        if saved is not None and self.spec.budget_s == saved["budget_s"]:
            plan = BudgetPlan.from_dict(saved)
            if plan.frozen_layers is not None:  # the model was built whole: frozen again as its plan froze it
                freeze_bottom(run.accelerator.unwrap_model(run.model), embeddings=True, layers=plan.frozen_layers)
            self._apply(run, plan)
        elif saved is not None:
            logger.info(
                "the plan made for a time budget of %s is dropped (the budget is now %s): planning again from "
                "update %d",
                format_duration(saved["budget_s"]),
                format_duration(self.spec.budget_s),
                run.state.step,
            )
            run.state.budget_plan = run.state.end_step = None
        self.deadline.mark = time.perf_counter()  # loading the checkpoint is not the run's time

    def on_start(self, run: Any) -> None:
        state = run.state
        self.deadline.on_replan = lambda at, total: self._replan(run, at, total)
        if state.budget_plan is not None:
            logger.info(
                "the time budget's plan goes on: %d updates in all, %s of %s used",
                run.total_steps,
                format_duration(state.budget_used_s),
                format_duration(self.spec.budget_s),
            )
            return
        if state.stop_reason is not None or state.step >= run.total_steps:
            return
        ends = time.strftime("%H:%M:%S", time.localtime(time.time() + self.spec.budget_s - state.budget_used_s))
        logger.info(
            "time budget %s: the first %d updates are timed, then the run is planned so that its training and "
            "evaluations end by about %s",
            format_duration(self.spec.budget_s),
            PROBE_UPDATES,
            ends,
        )
        run.timing = True  # the warm-up's updates are trained here, with nothing else between them
        try:
            plan = self._plan(run, eval_s=run.evaluator.seconds)
            if self._cheaper(run, plan):
                plan = self._plan_frozen(run, plan)
        finally:
            run.timing = False
        self._apply(run, plan)
        ends = time.strftime("%H:%M:%S", time.localtime(time.time() + plan.expected_s - plan.spent_s))
        logger.info("%s (at about %s)", plan.describe(), ends)
        self._warn_patience(plan)
        run.recorder.replan(run.record, total_steps=plan.total_steps)

    def on_update(self, run: Any, update: Any) -> None:
        self.deadline(update)

    def state_dict(self) -> None:
        # The count lives in TrainState (budget_used_s, beside the plan): brought up to date as a checkpoint is written.
        self.deadline.used()

    def _cheaper(self, run: Any, plan: BudgetPlan) -> bool:
        """Whether a plan this short should freeze the bottom (one process only: DistributedDataParallel keeps
        the set of parameters it reduces from the start)."""
        if not self.spec.freeze_below or plan.total_steps >= self.spec.freeze_below:
            return False
        if run.accelerator.num_processes > 1:
            logger.info(
                "a short run here (%d updates, fewer than budget_freeze_below=%d), but the bottom is not frozen with "
                "several processes; set freeze_embeddings and freeze_layers to freeze it from the start",
                plan.total_steps,
                self.spec.freeze_below,
            )
            return False
        return True

    def _plan_frozen(self, run: Any, first: BudgetPlan) -> BudgetPlan:
        """Freeze the embeddings and the lowest layers, time the cheaper updates and plan again, as from the start."""
        logger.info(
            "a short run here: %d updates would fit with every layer training (fewer than budget_freeze_below=%d); "
            "freezing the embeddings and the lowest %d layers and timing again",
            first.total_steps,
            self.spec.freeze_below,
            self.spec.freeze_layers,
        )
        freeze_bottom(run.accelerator.unwrap_model(run.model), embeddings=True, layers=self.spec.freeze_layers)
        plan = self._plan(run, eval_s=first.eval_s)
        return dataclasses.replace(
            plan, from_step=0, frozen_layers=self.spec.freeze_layers, unfrozen_steps=first.total_steps
        )

    def _plan(self, run: Any, *, eval_s: float) -> BudgetPlan:
        try:
            return plan_run(
                run.accelerator,
                run.order,
                run.state,
                run.model,
                run.train_pass,
                self.spec,
                self.deadline,
                total_steps=run.total_steps,
                per_epoch=run.per_epoch,
                eval_s=eval_s,
                eval_loaders=run.evaluator.loaders,
            )
        except BudgetTooSmall as err:  # the folder holds only this attempt's records: say how to try again there
            raise BudgetTooSmall(f"{err}; to try again in {run.output_dir}, add --overwrite true") from err

    def _warn_patience(self, plan: BudgetPlan) -> None:
        if self.patience is None:
            return
        evaluations = count_evaluations(
            total=plan.total_steps,
            per_epoch=plan.per_epoch,
            eval_every=self.spec.eval_every,
            eval_first=self.eval_first,
        )
        if evaluations < self.patience + 1:
            logger.warning(
                "early_stopping_patience=%d cannot end this run as planned: it evaluates too seldom before its last "
                "update (evaluate more often: eval_every_steps)",
                self.patience,
            )

    def _apply(self, run: Any, plan: BudgetPlan) -> None:
        """Cut the run to its plan: its questions, its length, and a schedule that ends at its last update (with the
        times it was planned again as it went, on resume)."""
        run.state.budget_plan = run.record["_budget_plan"] = plan.to_dict()
        run.order.sampler.limit = plan.questions if plan.questions < plan.pool_questions else None
        run.total_steps, run.per_epoch, run.warmup_steps = plan.total_steps, plan.per_epoch, plan.warmup_steps
        # planned again mid-run: from the LR where it stood down to 0, as a shortening does
        self._reschedule(run, plan.planned_steps, plan.warmup_steps, shortened_at=plan.from_step or None)
        for at, total in plan.replanned:
            self._reschedule(run, total, plan.warmup_steps, shortened_at=at)

    def _reschedule(self, run: Any, total: int, warmup: int, *, shortened_at: int | None) -> None:
        reschedule(
            run.scheduler,
            total_steps=total,
            warmup_steps=warmup,
            schedule=self.spec.schedule,
            shortened_at=shortened_at,
        )

    def _replan(self, run: Any, at: int, total: int) -> None:
        """The run fell behind its plan, or ran ahead of it: it ends at update `total` instead, its LR decaying from
        where it is at update `at` to 0 there; recorded in the plan, so a resumed run has the same schedule."""
        plan = BudgetPlan.from_dict(run.state.budget_plan)
        if total < plan.total_steps:
            logger.warning(
                "behind the time budget's plan at update %d: the run now ends at update %d instead of %d, its LR "
                "decaying to 0 there",
                at,
                total,
                plan.total_steps,
            )
        else:
            logger.info(
                "ahead of the time budget's plan at update %d (faster than the warm-up measured): the run now ends "
                "at update %d instead of %d, its LR decaying to 0 there",
                at,
                total,
                plan.total_steps,
            )
        plan = dataclasses.replace(plan, total_steps=total, replanned=(*plan.replanned, (at, total)))
        run.state.budget_plan = run.record["_budget_plan"] = plan.to_dict()
        run.total_steps = run.state.end_step = total
        self._reschedule(run, total, plan.warmup_steps, shortened_at=at)
        run.recorder.replan(run.record, total_steps=total)
