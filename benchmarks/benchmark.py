"""Throughput: bertqa's training/eval loop against transformers.Trainer, set up two ways, in the same run.

All train on the same real SQuAD train windows (max 384 / stride 128), the same model, per-device batch and
precision. "run_qa.py setup" pads every window to max_seq_length (run_qa.py's default) and keeps the Trainer's
defaults; "tuned" is the strongest fair setup of the Trainer: unpadded windows, length-grouped sampling,
DataCollatorWithPadding(pad_to_multiple_of=8), fused AdamW where bertqa uses it, torch_compile when bertqa compiles.
bertqa uses length-grouped batches padded to a multiple of 8.

  python benchmarks/benchmark.py                                                  # CPU, the offline MiniLM
  python benchmarks/benchmark.py --shape bert-base --batch-size 64 --windows 2048   # GPU, BERT-base shape

Prints, for each: windows/s and examples/s, real tokens/s, padding efficiency, MFU on real tokens (when the device's
peak is known), peak memory; bertqa's eval windows/s; post-processing time of the whole v2 dev set; the ratios.
examples/s counts work done: real tokens/s over the mean real tokens of an example, so a loop whose timed batches
are shorter than average is not favoured. Each loop makes --passes passes over the windows and only the last is
timed: the first meets every batch shape for the first time (kernel selection, allocator growth), which a long run
spreads over thousands of updates, and a loop measured after another would otherwise start with its warm caches.
Each loop runs in a fresh process (nothing left over from the loop before), all with the same settings: threads,
and on a CPU the allocator setting of `bertqa.training.runtime.keep_freed_memory`, which bertqa applies itself and a
careful Trainer user would get by setting MALLOC_* variables.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from typing import Any

from _trainer import padded_dataset, training_arguments

from bertqa.cli import HelpFormatter, positive_float, positive_int, probability, run, setup_logging, writable_file

# Dense bf16 tensor-core peaks (TFLOP/s) used for MFU; unknown devices print no MFU unless --peak-tflops is given.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}
BERT_BASE = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072}


def add_model_flags(p: argparse.ArgumentParser) -> None:
    """Which model is measured, shared with benchmarks/memory.py."""
    p.add_argument("--model", default="minilm-l6", help="model alias/folder (weights or, with --shape, its config)")
    p.add_argument(
        "--shape",
        choices=("pretrained", "bert-base"),
        default="pretrained",
        help="pretrained: the model as is; bert-base: BERT-base shape from config, random weights",
    )


def add_measure_flags(p: argparse.ArgumentParser, *, windows: int, batch_size: int) -> None:
    """The flags that say what is measured, shared with benchmarks/profile_loop.py."""
    add_model_flags(p)
    p.add_argument("--windows", type=positive_int, default=windows, help="real SQuAD train windows per pass")
    p.add_argument("--batch-size", type=positive_int, default=batch_size, help="windows per batch, in every loop")
    p.add_argument(
        "--precision",
        "--mixed-precision",
        choices=("auto", "no", "bf16", "fp16"),
        default="auto",
        help="autocast precision; auto: bf16 where the hardware runs it natively (GPUs that support it, CPUs with "
        "AMX or AVX512-BF16), else fp32 (no)",
    )
    p.add_argument(
        "--attention-dropout",
        type=probability,
        help="the model's attention dropout, in every loop (unset: the model's own; 0 as in the quick preset)",
    )
    p.add_argument("--seed", type=int, default=0, help="draws the examples and the batch order")


def check_measure_flags(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.windows < args.batch_size:
        p.error(f"--windows ({args.windows}) is smaller than --batch-size ({args.batch_size}): no full batch to time")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_measure_flags(p, windows=512, batch_size=16)
    p.add_argument(
        "--passes",
        type=int,
        default=2,
        help="passes over the windows per loop; only the last is timed (the first meets every batch shape for the "
        "first time: kernel choice, allocator growth), as in a long run",
    )
    p.add_argument("--compile", action="store_true", help="torch.compile bertqa's model (and the tuned Trainer's)")
    p.add_argument(
        "--eval-examples", type=positive_int, default=300, help="v2 dev examples for bertqa's evaluation timing"
    )
    p.add_argument(
        "--trainers",
        choices=("both", "tuned", "none"),
        default="both",
        help="which Trainer arms to measure beside bertqa: run_qa.py setup and tuned, the tuned one only, or none",
    )
    p.add_argument(
        "--peak-tflops", type=positive_float, help="device peak for MFU (unset: known GPUs only, no MFU elsewhere)"
    )
    p.add_argument("--json", type=writable_file, help="also write the results here")
    args = p.parse_args(argv)
    if args.passes < 2:
        p.error("--passes must be at least 2: the first pass is the warm-up")
    check_measure_flags(p, args)
    return args


def flops_per_window(n_params: int, layers: int, hidden: int, length: int) -> float:
    """Training FLOPs of one window counted on its real tokens: 6 x params x tokens, plus attention scores and
    weighted sums (2 matmuls of 2 x length x hidden per token per layer, x3 for forward and backward)."""
    return 6 * n_params * length + 12 * layers * hidden * length * length


def pass_seconds(marks: dict[int, float], steps: int, passes: int) -> list[float]:
    """Seconds of each pass, from the times taken after every `steps` updates (and before the first)."""
    return [marks[(k + 1) * steps] - marks[k * steps] for k in range(passes)]


def sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_memory_gib(device: Any) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None


def fresh_model(args: argparse.Namespace) -> Any:
    import torch

    from bertqa.model import build_model

    torch.manual_seed(args.seed)
    if args.shape == "bert-base":
        return build_model(
            args.model, pretrained=False, config_overrides=BERT_BASE, attention_dropout=args.attention_dropout
        )
    return build_model(args.model, attention_dropout=args.attention_dropout)


LOOPS = ("bertqa", "Trainer (run_qa.py setup)", "Trainer (tuned)")


def train_windows(args: argparse.Namespace) -> Any:
    """The first `args.windows` windows of the drawn train examples, labelled."""
    from bertqa import data, sources
    from bertqa.model import build_tokenizer

    examples, _ = sources.load_examples("train-v1.1", max_examples=args.windows, seed=args.seed)
    features = data.label_features(data.tokenize_examples(examples, build_tokenizer(args.model)), examples)
    return features.select(range(min(args.windows, len(features))))


def measure(name: str, args: argparse.Namespace, precision: str) -> dict[str, Any]:
    """One loop's raw figures (run in a process of its own)."""
    import torch

    from bertqa.training.runtime import keep_freed_memory

    setup_logging()  # a spawned process starts with the libraries' own logging
    if not torch.cuda.is_available():
        keep_freed_memory()  # what bertqa sets for itself; a careful Trainer user would set MALLOC_* variables
    features = train_windows(args)
    if name == "bertqa":
        return bench_bertqa(args, features, precision)
    return bench_trainer(args, features, precision, tuned=name == "Trainer (tuned)")


def in_fresh_process(name: str, args: argparse.Namespace, precision: str) -> dict[str, Any]:
    """`measure` in a new process: a loop measured after another in the same process would find the allocator,
    kernel caches and GPU memory pool in whatever state the one before left them."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(measure, name, args, precision).result()


def bench_bertqa(args, features, precision: str) -> dict[str, Any]:
    import torch

    from bertqa import engine
    from bertqa.batching import train_loader
    from bertqa.training.optim import build_optimizer, build_scheduler, fused_adamw_applies

    accelerator = engine.make_accelerator(mixed_precision=precision)
    model = fresh_model(args)
    if args.compile:
        model = torch.compile(model, dynamic=True)
    # Length groups as large as the Trainer's: it sorts pools of min(windows / (4 x batch), 50) batches, and
    # bertqa's default pool of 50 batches would sort more finely than that on a benchmark-sized sample.
    pool = max(1, min(len(features) // (4 * args.batch_size), 50))
    loader, sampler = train_loader(
        features,
        batch_size=args.batch_size,
        seed=args.seed,
        group_by_length=True,
        pad_token_id=0,
        pin_memory=torch.cuda.is_available(),
        pool_batches=pool,
    )
    steps = len(sampler)
    fused = fused_adamw_applies(accelerator.device.type)
    optimizer = build_optimizer(model, lr=3e-5, weight_decay=0.01, eps=1e-8, fused=fused)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    scheduler = build_scheduler(optimizer, total_steps=steps * args.passes, warmup_steps=0, schedule="constant")
    first, last = (args.passes - 1) * steps, args.passes * steps  # the timed pass: after update `first` to `last`
    marks: dict[int, float] = {}

    def mark(update: engine.Update) -> None:
        if update.step % steps == 0:
            sync(accelerator.device)
            marks[update.step] = time.perf_counter()

    if accelerator.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sync(accelerator.device)
    marks[0] = time.perf_counter()
    state, order = engine.TrainState(), engine.DataOrder(loader, sampler)
    for _ in range(args.passes):
        engine.train_one_epoch(
            accelerator,
            model,
            optimizer,
            scheduler,
            order.batches(accelerator, state),
            state=state,
            max_steps=last,
            log_every=steps,
            callbacks=[mark],
        )
        order.end_pass(state)
    timed = sampler.batches()  # the last pass's batches
    padded = [math.ceil(max(features.lengths[b]) / 8) * 8 * len(b) for b in timed]
    result = {
        "seconds": marks[last] - marks[first],
        "pass_seconds": pass_seconds(marks, steps, args.passes),
        "windows": sum(len(b) for b in timed),
        "real_tokens": int(sum(features.lengths[b].sum() for b in timed)),
        "padded_tokens": int(sum(padded)),
        "lengths": [features.lengths[b].tolist() for b in timed],
        "peak_memory_gib": peak_memory_gib(accelerator.device),
        "device": str(accelerator.device),
        "precision": accelerator.mixed_precision,
    }
    result.update(bench_eval(args, accelerator, model))
    return result


def bench_eval(args, accelerator, model) -> dict[str, Any]:
    from bertqa import data, sources
    from bertqa.inference import eval_batches, predict_logits
    from bertqa.model import build_tokenizer

    tokenizer = build_tokenizer(args.model)
    examples, _ = sources.load_examples("dev-v2.0", max_examples=args.eval_examples, seed=args.seed)
    features = data.tokenize_examples(examples, tokenizer)
    loader = eval_batches(features, batch_size=64, pad_token_id=tokenizer.pad_token_id, accelerator=accelerator)
    predict_logits(model, loader, accelerator=accelerator)  # warm-up
    sync(accelerator.device)
    t0 = time.perf_counter()
    predict_logits(model, loader, accelerator=accelerator)
    sync(accelerator.device)
    return {"eval_windows_per_s": len(features) / (time.perf_counter() - t0)}


def bench_trainer(args, features, precision: str, *, tuned: bool = False) -> dict[str, Any]:
    """transformers.Trainer on the same windows. As run_qa.py sets it up (`tuned=False`): every window padded to
    max_seq_length, the default optimizer (fused AdamW since torch 2.8). As a careful user would (`tuned=True`):
    unpadded windows, length-grouped sampling, `DataCollatorWithPadding(pad_to_multiple_of=8)`, fused AdamW where
    bertqa uses it, and `torch_compile` when bertqa compiles."""
    import torch
    from transformers import DataCollatorWithPadding, Trainer, TrainerCallback, default_data_collator

    from bertqa.data import Window
    from bertqa.model import build_tokenizer
    from bertqa.training.optim import fused_adamw_applies

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    width = Window().max_seq_length  # the windows' own setting: run_qa.py pads every window to it
    if tuned:
        dataset = unpadded_windows(features)
        pad = DataCollatorWithPadding(build_tokenizer(args.model), pad_to_multiple_of=8)
    else:
        dataset, pad = padded_dataset(features, width=width, pad_token_id=0, labelled=True), default_data_collator
    seen: list[tuple[list[int], int]] = []  # (window lengths, padded tokens) of each batch, in the loop's order

    def collate(rows: list[dict]) -> dict:
        batch = pad(rows)
        seen.append((batch["attention_mask"].sum(dim=1).tolist(), batch["input_ids"].numel()))
        return batch

    steps = math.ceil(len(dataset) / args.batch_size)
    first, last = (args.passes - 1) * steps, args.passes * steps  # the timed pass, as in `bench_bertqa`
    marks: dict[int, float] = {}

    class Timer(TrainerCallback):
        def on_train_begin(self, _args, state, control, **kwargs):
            sync(device)
            marks[0] = time.perf_counter()

        def on_step_end(self, _args, state, control, **kwargs):
            if state.global_step % steps == 0:
                sync(device)
                marks[state.global_step] = time.perf_counter()

    tuning = {}
    if tuned:
        tuning = {"train_sampling_strategy": "group_by_length", "torch_compile": args.compile}
        tuning["optim"] = "adamw_torch_fused" if fused_adamw_applies(device.type) else "adamw_torch"
    with tempfile.TemporaryDirectory() as tmp:
        training_args = training_arguments(
            tmp,
            precision=precision,
            seed=args.seed,
            per_device_train_batch_size=args.batch_size,
            max_steps=last,
            learning_rate=3e-5,
            disable_tqdm=True,
            logging_steps=10**9,
            **tuning,
        )
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        trainer = Trainer(
            model=fresh_model(args),
            args=training_args,
            train_dataset=dataset,
            data_collator=collate,
            callbacks=[Timer()],
        )
        trainer.train()
    # The tokens of the batches actually timed, in the loop's own order (the collator sees every batch once).
    timed = seen[first:last]
    return {
        "seconds": marks[last] - marks[first],
        "pass_seconds": pass_seconds(marks, steps, args.passes),
        "windows": len(dataset),
        "real_tokens": sum(sum(lengths) for lengths, _ in timed),
        "padded_tokens": sum(padded for _, padded in timed),
        "lengths": [lengths for lengths, _ in timed],
        "peak_memory_gib": peak_memory_gib(trainer.args.device),
        "device": str(trainer.args.device),
    }


def unpadded_windows(features) -> list[dict[str, Any]]:
    """Each window as the dict a tokenizer returns (plus labels), unpadded: what DataCollatorWithPadding takes."""
    rows = []
    for i in range(len(features)):
        ids = features.input_ids[i].tolist()
        row = {"input_ids": ids, "attention_mask": [1] * len(ids)}
        if features.token_type_ids is not None:
            row["token_type_ids"] = features.token_type_ids[i].tolist()
        row["start_positions"] = int(features.start_positions[i])
        row["end_positions"] = int(features.end_positions[i])
        rows.append(row)
    return rows


def postprocess_seconds(args) -> float:
    """The whole v2 dev set (11,873 questions) through the vectorised post-processing, on random logits."""
    import numpy as np

    from bertqa import data, loading, postprocess
    from bertqa.model import build_tokenizer

    examples, _ = loading.load_squad("dev-v2.0")
    features = data.tokenize_examples(examples, build_tokenizer(args.model))
    rng = np.random.default_rng(args.seed)
    shape = (len(features), int(features.lengths.max()))
    start, end = rng.normal(size=shape).astype(np.float32), rng.normal(size=shape).astype(np.float32)
    t0 = time.perf_counter()
    postprocess.postprocess(examples, features, start, end)
    return time.perf_counter() - t0


def summarise(
    name: str,
    r: dict[str, Any],
    *,
    n_params: int,
    layers: int,
    hidden: int,
    peak: float | None,
    tokens_per_example: float,
) -> dict[str, Any]:
    """One loop's figures. examples/s is counted in work, not windows: real tokens/s over the data's mean real tokens
    per example, so a loop whose timed batches happen to be shorter (or longer) than average is not favoured."""
    flops = sum(flops_per_window(n_params, layers, hidden, n) for batch in r.pop("lengths") for n in batch)
    out = {
        "loop": name,
        "windows_per_s": r["windows"] / r["seconds"],
        "examples_per_s": r["real_tokens"] / r["seconds"] / tokens_per_example,
        "real_tokens_per_s": r["real_tokens"] / r["seconds"],
        "padding_efficiency": r["real_tokens"] / r["padded_tokens"],
        "tflops_real": flops / r["seconds"] / 1e12,
        "mfu_real": flops / r["seconds"] / 1e12 / peak if peak else None,
        **{k: v for k, v in r.items() if k not in {"seconds", "windows", "real_tokens", "padded_tokens"}},
        "timed_windows": r["windows"],
        "seconds": r["seconds"],
    }
    return out


def device_peak(args) -> float | None:
    import torch

    if args.peak_tflops:
        return args.peak_tflops
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
    import torch
    import transformers

    from bertqa.training.runtime import resolve_precision

    precision = resolve_precision(args.precision)
    features = train_windows(args)
    tokens_per_example = features.lengths.sum() / len(set(features.example_index.tolist()))
    probe = fresh_model(args)
    cfg = probe.config
    n_params = sum(p.numel() for n, p in probe.named_parameters() if "embeddings" not in n)
    del probe
    peak = device_peak(args)
    shape = dict(
        n_params=n_params,
        layers=cfg.num_hidden_layers,
        hidden=cfg.hidden_size,
        peak=peak,
        tokens_per_example=tokens_per_example,
    )
    loops = {"both": LOOPS, "tuned": LOOPS[::2], "none": LOOPS[:1]}[args.trainers]
    results = [summarise(name, in_fresh_process(name, args, precision), **shape) for name in loops]
    report = {
        "device": torch.cuda.get_device_name()
        if torch.cuda.is_available()
        else f"CPU ({torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "model": args.model if args.shape == "pretrained" else f"BERT-base shape from config ({args.model} vocab)",
        "non_embedding_params": n_params,
        "batch_size": args.batch_size,
        "precision": precision,
        "compile": args.compile,
        "attention_dropout": args.attention_dropout,
        "windows": len(features),
        "results": results,
        "postprocess_v2_dev_s": postprocess_seconds(args),
    }
    by_loop = {r["loop"]: r["examples_per_s"] for r in results}
    if "Trainer (run_qa.py setup)" in by_loop:
        report["ratio_examples_per_s"] = by_loop["bertqa"] / by_loop["Trainer (run_qa.py setup)"]
    if "Trainer (tuned)" in by_loop:
        report["ratio_tuned_examples_per_s"] = by_loop["bertqa"] / by_loop["Trainer (tuned)"]
    print_report(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


def print_report(report: dict[str, Any]) -> None:
    print(f"device {report['device']} | torch {report['torch']} | transformers {report['transformers']}")
    dropout = report["attention_dropout"]
    print(
        f"model {report['model']} ({report['non_embedding_params'] / 1e6:.1f}M non-embedding params), "
        f"batch {report['batch_size']}, precision {report['precision']}, compile {report['compile']}, "
        f"attention dropout {'as the model' if dropout is None else dropout}, "
        f"{report['windows']} real SQuAD train windows"
    )
    columns = ("windows/s", "examples/s", "tokens/s", "pad eff", "TFLOP/s", "MFU", "peak GiB")
    widths = (10, 10, 10, 8, 8, 6, 8)
    print(f"{'loop':28} " + " ".join(f"{c:>{w}}" for c, w in zip(columns, widths)))
    for r in report["results"]:
        mfu = f"{100 * r['mfu_real']:.1f}%" if r["mfu_real"] is not None else "n/a"
        mem = f"{r['peak_memory_gib']:.1f}" if r["peak_memory_gib"] is not None else "n/a"
        print(
            f"{r['loop']:28} {r['windows_per_s']:10.1f} {r['examples_per_s']:10.1f} {r['real_tokens_per_s']:10.0f} "
            f"{100 * r['padding_efficiency']:7.1f}% {r['tflops_real']:8.2f} {mfu:>6} {mem:>8}"
        )
    for r in report["results"]:
        print(f"{r['loop']}: seconds per pass " + ", ".join(f"{t:.2f}" for t in r["pass_seconds"]) + " (last timed)")
    print(f"bertqa eval: {report['results'][0]['eval_windows_per_s']:.1f} windows/s (length-sorted batches)")
    print(f"post-processing of the whole v2 dev set: {report['postprocess_v2_dev_s']:.2f} s")
    if "ratio_examples_per_s" in report:
        print(f"ratio bertqa / Trainer (run_qa.py setup), examples/s: {report['ratio_examples_per_s']:.2f}x")
    if "ratio_tuned_examples_per_s" in report:
        print(f"ratio bertqa / Trainer (tuned), examples/s: {report['ratio_tuned_examples_per_s']:.2f}x")


if __name__ == "__main__":
    run(main)
