"""Where one training update of bertqa's loop spends its time: data, forward + loss, backward, optimizer.

Two measurements on the same real SQuAD train windows, model and precision as benchmarks/benchmark.py:
  1. phases: each phase of an update timed on its own, with the device synchronised before and after it, so the
     time is the phase's whole cost (host work and device work);
  2. the same updates as the loop runs them (no synchronisation inside), plus the data time: per update. When it is
     well below the sum of the phases, host and device overlap; when it is about equal, every update waits for
     the host (launch-bound) or for a copy.
Then torch.profiler's operators, by time on the host and, on a GPU, on the device.

  python benchmarks/profile_loop.py                                  # CPU, the offline MiniLM
  python benchmarks/profile_loop.py --shape bert-base --batch-size 64   # GPU, BERT-base shape
"""

from __future__ import annotations

import argparse
import statistics
import time
from contextlib import contextmanager

from benchmark import add_measure_flags, check_measure_flags, fresh_model, sync, train_windows

from bertqa.cli import HelpFormatter, positive_int, run, setup_logging, writable_file


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_measure_flags(p, windows=256, batch_size=16)
    p.add_argument("--steps", type=positive_int, default=8, help="updates timed in each measurement (after a warm-up)")
    p.add_argument("--top", type=positive_int, default=12, help="operators listed from the profiler")
    p.add_argument("--trace", type=writable_file, help="also write the profiler's Chrome trace here")
    args = p.parse_args(argv)
    check_measure_flags(p, args)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
    import torch

    from bertqa import engine
    from bertqa.batching import train_loader
    from bertqa.model import build_tokenizer
    from bertqa.training.optim import build_optimizer, build_scheduler, fused_adamw_applies
    from bertqa.training.runtime import resolve_precision

    tokenizer = build_tokenizer(args.model)
    features = train_windows(args)
    accelerator = engine.make_accelerator(mixed_precision=resolve_precision(args.precision))
    device = accelerator.device
    loader, sampler = train_loader(
        features,
        batch_size=args.batch_size,
        seed=args.seed,
        group_by_length=True,
        pad_token_id=tokenizer.pad_token_id,
        pin_memory=device.type == "cuda",
    )
    model = fresh_model(args)
    optimizer = build_optimizer(model, lr=3e-5, weight_decay=0.01, eps=1e-8, fused=fused_adamw_applies(device.type))
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    scheduler = build_scheduler(optimizer, total_steps=10**6, warmup_steps=0, schedule="constant")
    model.train()

    def batches():  # endless, pass after pass, in the order a run has
        state, order = engine.TrainState(), engine.DataOrder(loader, sampler)
        while True:
            for batch in order.batches(accelerator, state):
                state.batches_done += 1
                yield batch
            order.end_pass(state)

    stream = batches()

    def update(batch) -> None:
        loss = engine.default_loss(model, batch)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()

    for _ in range(len(loader)):  # warm-up: every batch shape once
        update(next(stream))
    sync(device)

    phases: dict[str, list[float]] = {"data": [], "forward + loss": [], "backward": [], "clip + optimizer": []}

    @contextmanager
    def phase(name: str):
        sync(device)
        t0 = time.perf_counter()
        yield
        sync(device)
        phases[name].append(time.perf_counter() - t0)

    batches = []
    for _ in range(args.steps):
        with phase("data"):
            batches.append(next(stream))
    for batch in batches:  # the same batches twice: phase by phase, then as the loop runs them
        with phase("forward + loss"):
            loss = engine.default_loss(model, batch)
        with phase("backward"):
            accelerator.backward(loss)
        with phase("clip + optimizer"):
            accelerator.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
    sync(device)
    t0 = time.perf_counter()
    for batch in batches:
        update(batch)
    sync(device)
    loop_ms = (time.perf_counter() - t0) / args.steps * 1e3 + statistics.mean(phases["data"]) * 1e3

    print(
        f"device {device}, precision {accelerator.mixed_precision}, batch {args.batch_size}, {args.steps} updates each"
    )
    total = sum(statistics.mean(v) for v in phases.values()) * 1e3
    for name, values in phases.items():
        ms = statistics.mean(values) * 1e3
        print(f"  {name:18} {ms:9.2f} ms  {100 * ms / total:5.1f}%")
    print(f"  {'sum of phases':18} {total:9.2f} ms")
    print(f"  {'loop as it runs':18} {loop_ms:9.2f} ms per update, data included ({total / loop_ms:.2f}x overlap)")

    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(args.steps):
            update(next(stream))
        sync(device)
    events = prof.key_averages()
    print(events.table(sort_by="self_cpu_time_total", row_limit=args.top))
    if device.type == "cuda":
        print(events.table(sort_by="self_device_time_total", row_limit=args.top))
    if args.trace:
        prof.export_chrome_trace(str(args.trace))
    return 0


if __name__ == "__main__":
    run(main)
