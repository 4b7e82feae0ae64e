"""Peak training memory and update time of full fine-tuning, gradient checkpointing and LoRA, side by side.

Each setup trains a few updates in a process of its own (a process's peak only grows), on full-length windows of
random tokens (every window `--max-seq-length` long: the most memory a batch of that size can take), with the model
built the way `fit` builds it (`bertqa.training.setup.adapt`) and bertqa's AdamW:
  full       every weight trains
  ckpt       full, with --gradient-checkpointing
  lora       --lora-r (default 16) on the attention projections, the QA head in full
  lora+ckpt  both
Memory is the process's peak resident set on a CPU (the model, optimizer, activations and the libraries: all of
it; with the allocator set as a training run sets it, `keep_freed_memory`) and PyTorch's peak allocation on a GPU;
optimizer state is what AdamW holds after its first update. The table gives each setup's ratio to full fine-tuning,
measured in the same call.

  python benchmarks/memory.py --shape bert-base --max-seq-length 384 --batch-size 16        # the docs/MEMORY.md table
  python benchmarks/memory.py --precision no --json runs/memory.json                        # fp32, MiniLM
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmark import BERT_BASE, add_model_flags

from bertqa.cli import HelpFormatter, positive_int, run, setup_logging, writable_file

SETUPS = {
    "full": {},
    "ckpt": {"gradient_checkpointing": True},
    "lora": {"lora_r": 16},
    "lora+ckpt": {"lora_r": 16, "gradient_checkpointing": True},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_model_flags(p)
    p.add_argument("--max-seq-length", type=positive_int, default=384, help="tokens per window (all of them used)")
    p.add_argument("--batch-size", type=positive_int, default=16, help="windows per update")
    p.add_argument("--steps", type=positive_int, default=2, help="updates timed, after one that is not")
    p.add_argument("--lora-r", type=positive_int, default=16, help="LoRA rank of the lora setups")
    p.add_argument(
        "--precision",
        choices=("auto", "no", "bf16"),
        default="auto",
        help="autocast precision; auto: bf16 where the hardware runs it natively, else fp32 (no)",
    )
    p.add_argument("--setups", nargs="+", choices=tuple(SETUPS), default=list(SETUPS), help="which setups to measure")
    p.add_argument("--json", type=writable_file, help="also write the figures here")
    p.add_argument("--one", choices=tuple(SETUPS), help=argparse.SUPPRESS)  # a child process: one setup
    return p.parse_args(argv)


def measure(args: argparse.Namespace, setup: str) -> dict[str, Any]:
    """One setup's figures, in this process."""
    import torch

    from bertqa.config import TrainConfig
    from bertqa.engine import default_loss
    from bertqa.model import build_model
    from bertqa.training import optim
    from bertqa.training.runtime import keep_freed_memory, resolve_precision
    from bertqa.training.setup import adapt

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        keep_freed_memory()  # the allocator setting of a training run, whose peak is what its records show
    bf16 = resolve_precision(args.precision, device=device.type) == "bf16"
    torch.manual_seed(0)
    shape = BERT_BASE if args.shape == "bert-base" else {}
    model = build_model(args.model, pretrained=args.shape == "pretrained", config_overrides=shape)
    settings = {**SETUPS[setup], "lora_r": args.lora_r} if "lora" in setup else SETUPS[setup]
    model = adapt(TrainConfig(**settings), model).to(device).train()
    optimizer = optim.build_optimizer(model, lr=1e-4, weight_decay=0.01, eps=1e-8, fused=True)
    size = (args.batch_size, args.max_seq_length)
    batch = {
        "input_ids": torch.randint(1000, model.config.vocab_size, size, device=device),
        "attention_mask": torch.ones(size, dtype=torch.long, device=device),
        "token_type_ids": torch.zeros(size, dtype=torch.long, device=device),
        "start_positions": torch.randint(0, args.max_seq_length, size[:1], device=device),
        "end_positions": torch.randint(0, args.max_seq_length, size[:1], device=device),
    }
    before = _peak_mib(device)
    times = []
    for _ in range(args.steps + 1):
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = default_loss(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    state = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values() if t.dim())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {
        "setup": setup,
        "peak_mib": round(_peak_mib(device), 1),
        "before_training_mib": round(before, 1),
        "s_per_update": round(statistics.median(times[1:]), 3),
        "optimizer_state_mib": round(state / 2**20, 2),
        "trainable": trainable,
        "parameters": sum(p.numel() for n, p in model.named_parameters() if ".original_module." not in n),
        "precision": "bf16" if bf16 else "fp32",
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
    }


def _peak_mib(device: Any) -> float:
    import resource

    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.one:  # a child: its figures as the last line
        setup_logging()
        print(json.dumps(measure(args, args.one)))
        return 0
    passed = _without_json(argv if argv is not None else sys.argv[1:])
    results = []
    for setup in args.setups:
        cmd = [sys.executable, __file__, *passed, "--one", setup]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"setup {setup} failed:\n{done.stderr[-2000:]}")
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(f"measured {setup}", file=sys.stderr)
    print(table(results, args))
    if args.json:
        Path(args.json).write_text(
            json.dumps({"settings": vars(args), "results": results}, indent=2, default=str) + "\n"
        )
    return 0


def _without_json(argv: list[str]) -> list[str]:
    """The command line without its --json (a child writes no file)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a.startswith("--json="):
            continue
        elif a == "--json":
            skip = True
        else:
            out.append(a)
    return out


def table(results: list[dict[str, Any]], args: argparse.Namespace) -> str:
    first = results[0]
    base = next((r for r in results if r["setup"] == "full"), first)
    head = (
        f"{args.shape} ({args.model}), {args.batch_size} x {args.max_seq_length} tokens, {first['precision']}, "
        f"{first['device']}; ratios to {base['setup']}"
    )
    lines = [
        head,
        f"{'setup':<10} {'peak MiB':>9} {'ratio':>6} {'s/update':>9} {'ratio':>6} {'optim MiB':>10} {'ratio':>7} "
        f"{'trainable':>10}",
    ]
    for r in results:
        lines.append(
            f"{r['setup']:<10} {r['peak_mib']:>9.0f} {r['peak_mib'] / base['peak_mib']:>6.2f} "
            f"{r['s_per_update']:>9.2f} {r['s_per_update'] / base['s_per_update']:>6.2f} "
            f"{r['optimizer_state_mib']:>10.1f} {r['optimizer_state_mib'] / base['optimizer_state_mib']:>7.3f} "
            f"{100 * r['trainable'] / r['parameters']:>9.2f}%"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    run(main)
