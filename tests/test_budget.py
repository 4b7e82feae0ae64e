"""Training to a time budget: durations, the plan's arithmetic, the question-order batches, and runs of the tiny model
whose update time is set by a sleep, so that what the warm-up measures is known."""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest
import torch

from bertqa import engine
from bertqa.batching import QuestionOrderBatchSampler
from bertqa.config import TrainConfig, computation_changes, preset
from bertqa.training import budget
from bertqa.training.budget import (
    BudgetTooSmall,
    evaluations_between,
    format_duration,
    parse_duration,
    plan_steps,
)
from bertqa.training.optim import build_scheduler, reschedule
from bertqa.training.runtime import cpu_has_native_bf16, precision_reason, resolve_precision
from tests.conftest import tiny_config


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("600", 600),
        (90, 90),
        ("90s", 90),
        ("10m", 600),
        ("1h30m", 5400),
        ("1h 30m 15s", 5415),
        ("2.5m", 150),
        ("10min", 600),
        ("1H", 3600),
    ],
)
def test_durations_in_the_forms_people_write(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "10 minutes", "0", "-5", "1x", "m", "1m1h", "nan", True])
def test_a_malformed_duration_names_the_setting_and_the_forms(text):
    with pytest.raises(ValueError, match=r"time_budget .* is not a duration: give seconds \(600\) or .* 10m, 1h30m"):
        parse_duration(text)


def test_format_duration():
    assert [format_duration(s) for s in (0.42, 45, 485, 3725)] == ["0.4 s", "45 s", "8 min 5 s", "1 h 2 min"]


def test_config_takes_a_budget_and_refuses_it_beside_max_steps(tmp_path):
    assert TrainConfig(time_budget=600).time_budget == "600"  # a number from JSON or Python: seconds
    with pytest.raises(ValueError, match="time_budget '10 minutes' is not a duration"):
        TrainConfig(time_budget="10 minutes")
    with pytest.raises(ValueError, match="give time_budget or max_steps, not both"):
        TrainConfig(time_budget="10m", max_steps=100)
    assert preset("quick").time_budget is not None  # the first run is on a budget


def test_evaluations_between_counts_epoch_ends_periodic_and_the_final_one_once():
    assert evaluations_between(0, 10, per_epoch=100, eval_every=None) == 1
    assert evaluations_between(0, 250, per_epoch=100, eval_every=None) == 3  # 100, 200, 250
    assert evaluations_between(150, 250, per_epoch=100, eval_every=None) == 2  # 200, 250
    assert evaluations_between(0, 200, per_epoch=100, eval_every=50) == 4  # 50, 100, 150, 200


def test_plan_steps_is_the_largest_length_that_fits():
    plan = dict(s_per_update=2.0, eval_s=10.0, done=6, per_epoch=1000, eval_every=None)
    total = plan_steps(remaining_s=100.0, cap=1000, **plan)
    assert total == 51  # 45 more updates (90 s) + the final evaluation (10 s) = 100 s
    assert plan_steps(remaining_s=100.0, cap=20, **plan) == 20  # the epochs cap wins
    assert plan_steps(remaining_s=9.0, cap=1000, **plan) is None  # not even the final evaluation fits
    # an evaluation every 10 updates costs its time too: 6 + n updates with n * 2 + evaluations * 10 <= 100
    with_evals = plan_steps(remaining_s=100.0, cap=1000, **{**plan, "eval_every": 10})
    cost = (with_evals - 6) * 2 + evaluations_between(6, with_evals, per_epoch=1000, eval_every=10) * 10
    assert (
        cost
        <= 100
        < (with_evals + 1 - 6) * 2 + evaluations_between(6, with_evals + 1, per_epoch=1000, eval_every=10) * 10
    )


def sampler_data(questions=200, seed=0):
    rng = np.random.default_rng(seed)
    per_question = rng.choice([1, 1, 1, 2, 3], size=questions)
    example_index = np.repeat(np.arange(questions), per_question)
    lengths = rng.integers(20, 384, size=len(example_index))
    return lengths, example_index


def test_question_order_batches_take_questions_whole_in_a_seeded_order():
    lengths, example_index = sampler_data()
    sampler = QuestionOrderBatchSampler(lengths, example_index, 8, seed=3, first_pool=4, pool_batches=5)
    full = [i for b in sampler.batches() for i in b]
    assert sorted(full) == list(range(len(lengths)))  # every window once per pass
    first_pool = sampler.batches()[:4]
    sampler.limit = 50
    cut = sampler.batches()
    chosen = set(example_index[[i for b in cut for i in b]].tolist())
    assert len(chosen) == 50 and chosen != set(range(50))  # a seeded draw, not the first 50 of the file
    trained = sorted(i for b in cut for i in b)
    assert trained == sorted(np.flatnonzero(np.isin(example_index, list(chosen))).tolist())  # all their windows
    assert len(sampler) == math.ceil(len(trained) / 8) and all(len(b) == 8 for b in cut[:-1])
    assert cut[:4] == first_pool  # the warm-up's batches do not depend on where the plan cuts
    assert sampler.questions_to_keep(0, 4) <= 50
    other = QuestionOrderBatchSampler(lengths, example_index, 8, seed=4, first_pool=4)
    other.limit = 50
    assert set(example_index[[i for b in other.batches() for i in b]].tolist()) != chosen  # the seed decides


def test_a_limit_keeps_every_pool_already_trained_from_whole():
    lengths, example_index = sampler_data()
    sampler = QuestionOrderBatchSampler(lengths, example_index, 8, seed=1, first_pool=2, pool_batches=3)
    full = sampler.batches()
    for done in (1, 2, 3, 5, 6):
        sampler.limit = sampler.questions_to_keep(0, done)
        assert sampler.batches()[:done] == full[:done]  # the batches trained on stay where they were
        sampler.limit = None


def test_questions_within_fills_a_number_of_windows_without_passing_it():
    lengths, example_index = sampler_data()
    sampler = QuestionOrderBatchSampler(lengths, example_index, 8, seed=0, first_pool=2)
    for windows in (1, 37, 100, 250):
        n = sampler.questions_within(0, windows)
        assert sampler.questions_windows(0, n) <= windows < sampler.questions_windows(0, n + 1)
    assert sampler.questions_within(0, 1, at_least=30) == 30


def test_reschedule_gives_the_new_length_from_where_the_schedule_stands():
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    sched = build_scheduler(opt, total_steps=1000, warmup_steps=100)
    for _ in range(6):
        opt.step()
        sched.step()
    reschedule(sched, total_steps=40, warmup_steps=4)
    assert opt.param_groups[0]["lr"] == pytest.approx(1 - (6 - 4) / 36) == sched.get_last_lr()[0]
    for _ in range(34):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == 0.0  # ends at the new last update


def test_precision_says_why_and_a_cpu_held_below_bf16_trains_in_fp32(monkeypatch):
    assert precision_reason("no") == "fp32: asked for (mixed precision no)"
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert not cpu_has_native_bf16() and resolve_precision("auto", device="cpu") == "no"
    assert precision_reason("auto", device="cpu").startswith("fp32: this CPU has no native bf16 (")


# ---------------------------------------------------------------------------------------------------- budget runs


def sleepy(seconds_per_update, slower_after=None, slower=None):
    """A loss that also sleeps: the update time the warm-up measures is known (and can change after the plan)."""

    def loss(model, batch):
        late = slower_after is not None and loss.calls >= slower_after
        time.sleep(slower if late else seconds_per_update)
        loss.calls += 1
        return engine.default_loss(model, batch)

    loss.calls = 0
    return loss


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: the tiny model gains nothing from two, and on a machine busy with other work two threads
    wait on each other, which would make the update times these tests plan with swing widely."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def roomy(monkeypatch):
    """Plan for 80% of the time left instead of 97%, and never lengthen: the runs below must reach their planned end
    even on a machine busy with other work, so that the schedule's end can be checked (the deadline has tests of its
    own)."""
    monkeypatch.setattr(budget, "SAFETY", 0.8)
    monkeypatch.setattr(budget, "LENGTHEN_MARGIN", 1.0)
    return 0.8


def budget_config(tmp_path, **changes):
    settings = {"max_train_examples": 400, "epochs": 2.0, "time_budget": "4s", **changes}
    return tiny_config(tmp_path, mixed_precision="no", log_every=1, **settings)


def test_the_plan_comes_from_the_measured_rate_and_the_schedule_ends_at_its_last_update(tmp_path, tiny, roomy):
    summary = engine.fit(budget_config(tmp_path), model=tiny(), compute_loss=sleepy(0.04))
    plan = summary["budget_plan"]
    assert 0.04 <= plan["s_per_update"] < 0.2  # the sleep, and what the tiny model adds (more on a busy machine)
    fits = plan_steps(
        remaining_s=(4 - plan["spent_s"]) * roomy,
        s_per_update=plan["s_per_update"],
        eval_s=plan["eval_s"],
        done=6,
        cap=10_000,
        per_epoch=10_000,
        eval_every=None,
    )
    assert plan["questions"] < plan["pool_questions"] == 400  # less than a pass: a draw of whole questions
    assert fits - 2 <= plan["planned_steps"] <= fits  # whole questions fill at most the updates that fit
    assert plan["total_steps"] <= plan["cap_steps"] == plan["per_epoch"]  # lengthened, if at all, into the reserve
    assert summary["steps"] == plan["total_steps"] and summary["stopped_early"] is None
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    lr = {r["step"]: r["lr"] for r in log}
    total, warmup = plan["total_steps"], plan["warmup_steps"]
    assert lr[total] == 0.0  # the decay ends at the deadline, not cut off before it
    step = (warmup + total) // 2
    assert lr[step] == pytest.approx(1e-3 * (1 - (step - warmup) / (total - warmup)))
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["_budget_plan"] == plan and saved["time_budget"] == "4s"
    assert summary["wall_time_s"] < 4 * 1.15  # training and evaluations, within the budget and a margin of noise


def test_a_resumed_run_keeps_its_plan_instead_of_measuring_again(tmp_path, tiny, monkeypatch, roomy):
    def crash(update):
        if update.step == 30:
            raise RuntimeError("killed")

    config = budget_config(tmp_path, save_every_steps=25)
    planned = []
    measure = budget.plan_run

    def counted(*args, **kwargs):
        planned.append(True)
        return measure(*args, **kwargs)

    with monkeypatch.context() as m:  # where the plan is made: the patch below intercepts it
        m.setattr(budget, "plan_run", counted)
        with pytest.raises(RuntimeError, match="killed"):
            engine.fit(config, model=tiny(), compute_loss=sleepy(0.04), callbacks=[crash])
    assert planned == [True]
    plan = json.loads((tmp_path / "run" / "config.json").read_text())["_budget_plan"]

    def measure_again(*args, **kwargs):
        raise AssertionError("a resumed budget run measured again")

    monkeypatch.setattr(budget, "plan_run", measure_again)
    resumed = engine.fit(config.replace(resume="latest"), model=tiny(seed=1), compute_loss=sleepy(0.04))
    assert resumed["stopped_early"] is None, resumed["stopped_early"]
    assert resumed["budget_plan"] == plan and resumed["steps"] == plan["total_steps"]
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == plan["total_steps"] and log[-1]["lr"] == 0.0
    assert json.loads((tmp_path / "run" / "config.json").read_text())["_budget_plan"] == plan  # still on record


def test_a_changed_budget_on_resume_plans_again_and_a_budget_cannot_come_or_go(tmp_path, tiny, roomy):
    def crash(update):
        if update.step == 12:
            raise RuntimeError("killed")

    config = budget_config(tmp_path, save_every_steps=10, max_train_examples=40, epochs=50.0)  # passes of 5 updates
    with pytest.raises(RuntimeError, match="killed"):
        engine.fit(config, model=tiny(), compute_loss=sleepy(0.04), callbacks=[crash])
    for other in (config.replace(time_budget=None, max_steps=50), config.replace(time_budget=None)):
        with pytest.raises(
            ValueError, match="a time budget cannot be added to or removed from a run when it is resumed"
        ):
            engine.fit(other.replace(resume="latest", accept_changes=True), model=tiny())
    same = config.replace(resume="latest", time_budget="4")  # "4s" and "4" are one budget: no change to accept
    longer = engine.fit(
        config.replace(resume="latest", time_budget="6s", accept_changes=True), model=tiny(), compute_loss=sleepy(0.04)
    )
    plan = longer["budget_plan"]
    assert plan["budget_s"] == 6 and 10 <= plan["from_step"] < 12 and plan["total_steps"] > 40  # from its checkpoint
    assert 0.04 <= plan["s_per_update"] < 0.2  # timed where it stood, in a later pass
    # an evaluation and a checkpoint at every 5-update pass: the saves are not planned, so the deadline may end it
    assert longer["steps"] == plan["total_steps"] or longer["stopped_early"].startswith("time budget")
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert max(r["lr"] for r in log if r["step"] > 10) <= 1e-3  # from where it stood, down
    assert computation_changes(config.to_dict(), same.to_dict()) == {}


def test_the_warm_up_is_not_interrupted_by_evaluations_or_saves(tmp_path, tiny, roomy):
    config = budget_config(tmp_path, eval_every_steps=2, save_every_steps=2)
    summary = engine.fit(config, model=tiny(), compute_loss=sleepy(0.04))
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert min(steps) > 6 and summary["budget_plan"]["s_per_update"] < 0.2  # none of them in the timed updates


def test_a_short_run_freezes_the_bottom_plans_again_and_resumes_frozen(tmp_path, tiny, roomy):
    from bertqa.training.optim import layer_depths

    def crash(update):
        if update.step == 25:  # after the checkpoint of update 20 (none during the two warm-ups)
            raise RuntimeError("killed")

    config = budget_config(tmp_path, budget_freeze_below=100_000, budget_freeze_layers=1, save_every_steps=10)
    model = tiny()
    with pytest.raises(RuntimeError, match="killed"):
        engine.fit(config, model=model, compute_loss=sleepy(0.04), callbacks=[crash])
    plan = json.loads((tmp_path / "run" / "config.json").read_text())["_budget_plan"]
    assert plan["frozen_layers"] == 1 and plan["unfrozen_steps"] > 0 and plan["from_step"] == 0
    assert plan["probe_updates"] == 6  # the second warm-up, the one the rate comes from
    depths = layer_depths(tiny(), frozen=True)
    bottom = {n for n, d in depths.items() if d <= 1}
    assert {n for n, p in model.named_parameters() if not p.requires_grad} == bottom
    at_crash = {n: p.detach().clone() for n, p in model.named_parameters() if n in bottom}

    resumed_model = tiny(seed=1)
    resumed = engine.fit(config.replace(resume="latest"), model=resumed_model, compute_loss=sleepy(0.04))
    assert resumed["budget_plan"]["frozen_layers"] == 1 and resumed["steps"] == resumed["budget_plan"]["total_steps"]
    assert {n for n, p in resumed_model.named_parameters() if not p.requires_grad} == bottom
    for name, param in resumed_model.named_parameters():
        if name in bottom:  # frozen since update 6: as the checkpoint held them, and as they were at the crash
            assert torch.equal(param.detach(), at_crash[name]), name
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert log[-1]["lr"] == 0.0 and max(r["lr"] for r in log) == pytest.approx(1e-3, rel=0.2)


def test_a_run_planned_long_enough_keeps_every_layer_training(tmp_path, tiny, roomy):
    model = tiny()
    summary = engine.fit(budget_config(tmp_path, budget_freeze_below=3), model=model, compute_loss=sleepy(0.04))
    assert summary["budget_plan"]["frozen_layers"] is None
    assert all(p.requires_grad for p in model.parameters())


def test_a_budget_too_small_says_the_smallest_that_would_work(tmp_path, tiny):
    with pytest.raises(
        BudgetTooSmall,
        match=r"time_budget 0.3 s is too small here: the 6 warm-up updates .* "
        r"smallest budget that would finish is about .*\(time_budget \d+\)",
    ):
        engine.fit(budget_config(tmp_path, time_budget="0.3s"), model=tiny(), compute_loss=sleepy(0.1))


def test_a_machine_that_slows_down_still_ends_within_the_budget(tmp_path, tiny):
    slow = sleepy(0.03, slower_after=12, slower=0.15)  # five times slower soon after the plan
    summary = engine.fit(budget_config(tmp_path), model=tiny(), compute_loss=slow)
    plan = summary["budget_plan"]
    assert summary["wall_time_s"] < 4 + 0.15 + 1.0  # the budget, the update in flight, the final evaluation
    if plan["replanned"]:  # how it kept the budget (on a busy machine the warm-up may have measured slower still)
        assert summary["steps"] == plan["total_steps"] < plan["planned_steps"] or summary["stopped_early"]
        log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
        lrs = [r["lr"] for r in log]
        at = plan["replanned"][0][0]
        assert max(abs(a - b) for a, b in zip(lrs[at - 1 :], lrs[at:])) < 1e-3 * 0.2  # the LR never jumps
        assert lrs[-1] == 0.0 or summary["stopped_early"]  # and still decays to 0 at the new last update


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_the_deadline_shortens_a_run_that_falls_behind_and_stops_one_out_of_time(monkeypatch):
    from bertqa.training.state import StopTraining, TrainState

    clock = Clock()
    monkeypatch.setattr(budget.time, "perf_counter", clock)
    state = TrainState(step=6)
    state.budget_plan = {"total_steps": 100, "per_epoch": 100, "s_per_update": 1.0, "eval_s": 5.0}
    shortened = []
    deadline = budget.Deadline(state, budget_s=120.0, on_replan=lambda at, total: shortened.append((at, total)))
    clock.now = 10.0  # the warm-up and the plan took 10 s
    for step in range(7, 57):  # then 2 s per update: twice the measured second
        clock.now += 2.0
        deadline(engine.Update(step=step, epoch=0, lr=1.0, loss=torch.zeros(())))
    at, total = shortened[0]
    assert at == 56  # decided once 50 updates gave a steady rate
    used = 10.0 + 2.0 * (at - 6)
    assert total == plan_steps(
        remaining_s=(120 - used) * budget.SAFETY,
        s_per_update=2.0,
        eval_s=5.0,
        done=at,
        cap=100,
        per_epoch=100,
        eval_every=None,
    )
    late = TrainState(step=6)
    late.budget_plan = dict(state.budget_plan)
    stop = budget.Deadline(late, budget_s=20.0)  # no way to shorten: only the stop is left
    clock.now += 14.0
    stop(engine.Update(step=7, epoch=0, lr=1.0, loss=torch.zeros(())))  # 14 + 1 + 5 s: still fits
    clock.now += 2.0
    with pytest.raises(StopTraining, match=r"time budget: 16 s of 20 s used at update 8 of 100"):
        stop(engine.Update(step=8, epoch=0, lr=1.0, loss=torch.zeros(())))


def test_the_deadline_lengthens_a_run_that_turns_faster_up_to_its_reserve(monkeypatch):
    from bertqa.training.state import TrainState

    clock = Clock()
    monkeypatch.setattr(budget.time, "perf_counter", clock)
    plan = {"total_steps": 100, "per_epoch": 106, "cap_steps": 106, "s_per_update": 1.0, "eval_s": 5.0}
    state = TrainState(step=6, budget_plan={**plan, "warmup_steps": 10})
    replanned = []

    def replan(state):  # what the run does: the plan is its new length
        return lambda at, total: (replanned.append((at, total)), state.budget_plan.update(total_steps=total))

    deadline = budget.Deadline(state, budget_s=120.0, on_replan=replan(state))
    clock.now = 10.0
    for step in range(7, 120):  # half the measured second: ahead of the plan
        clock.now += 0.5
        deadline(engine.Update(step=step, epoch=0, lr=1.0, loss=torch.zeros(())))
    assert replanned[0] == (56, 106)  # once steady and past the warm-up; never past the reserve
    assert len(replanned) == 1  # at the reserve's end it stays there

    early = TrainState(step=6, budget_plan={**plan, "warmup_steps": 90})
    still = budget.Deadline(early, budget_s=120.0, on_replan=replan(early))
    for step in range(7, 90):  # as fast, but still warming up: the schedule's warm-up is not moved
        clock.now += 0.5
        still(engine.Update(step=step, epoch=0, lr=1.0, loss=torch.zeros(())))
    assert len(replanned) == 1

    on_time = TrainState(step=6, budget_plan={**plan, "warmup_steps": 10})
    steady = budget.Deadline(on_time, budget_s=112.0, on_replan=replan(on_time))
    on_time.budget_used_s = 10.0
    for step in range(7, 60):  # as measured: 94 updates and an evaluation fill 99 s of 102 left, the plan stands
        clock.now += 1.0
        steady(engine.Update(step=step, epoch=0, lr=1.0, loss=torch.zeros(())))
    assert len(replanned) == 1


def test_the_typical_update_leaves_out_the_slowest_twentieth():
    assert budget.typical([1.0] * 19 + [60.0]) == 1.0  # one update that also held an evaluation
    assert budget.typical([1.0, 3.0]) == 2.0  # too few to leave any out
    assert budget.typical([2.0] * 38 + [50.0, 70.0]) == 2.0


def test_a_plan_short_of_a_pass_draws_a_reserve_and_may_be_lengthened_into_it():
    spec = budget.BudgetSpec(
        budget_s=100.0,
        precision="fp32",
        grad_accum=1,
        warmup_ratio=0.1,
        schedule="linear",
        eval_every=None,
        eval_batch_size=8,
        pad_to_multiple_of=8,
    )
    lengths = np.full(2000, 100)
    sampler = QuestionOrderBatchSampler(lengths, np.arange(2000), 10, seed=0, first_pool=1, pool_batches=5)
    measured = dict(spent_s=10.0, s_per_update=1.0, eval_s=5.0, probe=6)
    plan = budget.make_plan(
        spec, sampler, **measured, done=6, cap=200, per_epoch=200, windows_per_update=10, first_pass=True
    )
    fits = plan_steps(
        remaining_s=90 * budget.SAFETY, s_per_update=1.0, eval_s=5.0, done=6, cap=200, per_epoch=200, eval_every=None
    )
    assert plan.total_steps == fits and plan.per_epoch == plan.cap_steps == math.ceil(fits * (1 + budget.RESERVE))
    assert plan.questions == plan.per_epoch * 10  # one window each: the reserve's questions, whole
    assert "updates of its pass a reserve for a machine that turns faster" in plan.describe()
    old = {**plan.to_dict(), "shortened": [[20, 70]]}
    del old["replanned"], old["cap_steps"]
    assert budget.BudgetPlan.from_dict(old).replanned == ((20, 70),)  # a plan saved before it was renamed


def test_a_shortened_schedule_decays_from_where_it_was_and_comes_back_alike():
    def scheduler():
        opt = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=1.0)
        return opt, build_scheduler(opt, total_steps=500, warmup_steps=50)

    opt, sched = scheduler()
    reschedule(sched, total_steps=100, warmup_steps=10)
    for _ in range(40):
        opt.step()
        sched.step()
    before = sched.get_last_lr()[0]
    reschedule(sched, total_steps=70, warmup_steps=10, shortened_at=40)
    assert sched.get_last_lr()[0] == pytest.approx(before)  # no jump where it was shortened
    lrs = []
    for _ in range(30):
        opt.step()
        sched.step()
        lrs.append(sched.get_last_lr()[0])
    assert lrs[-1] == 0.0 and lrs[14] == pytest.approx(before / 2, rel=0.05)  # linear from there to 0 at 70
    _, again = scheduler()  # a resumed run: the plan's length, then each shortening, in order
    reschedule(again, total_steps=100, warmup_steps=10)
    reschedule(again, total_steps=70, warmup_steps=10, shortened_at=40)
    assert [again.lr_lambdas[0](step) for step in range(71)] == [sched.lr_lambdas[0](step) for step in range(71)]


def test_a_length_given_later_wins_over_the_other_kind():
    assert preset("quick", max_steps=120).time_budget is None  # a preset's budget gives way to max_steps
    assert TrainConfig(max_steps=5).replace(time_budget="1m").max_steps is None
    with pytest.raises(ValueError, match="not both"):  # both in one place is refused
        preset("quick", max_steps=120, time_budget="2m")


@pytest.mark.e2e
def test_two_processes_agree_on_one_plan_and_end_together(tmp_path, tiny_dir):
    from tests.test_recipes import SETTINGS
    from tests.test_scripts import script, two_processes

    args = [
        "--model",
        tiny_dir,
        *SETTINGS,
        "--max-train-examples",
        "400",
        "--epochs",
        "3",
        "--time-budget",
        "6s",
        "--output-dir",
        tmp_path,
    ]
    out = json.loads(script("train.py", *map(str, args), launch=two_processes()).stdout.splitlines()[-1])
    plan = json.loads((tmp_path / "config.json").read_text())["_budget_plan"]
    assert out["planned_steps"] == plan["planned_steps"] and out["time_budget_s"] == 6
    assert out["steps"] == plan["total_steps"] or out["stopped_early"].startswith("time budget")  # both, or neither
