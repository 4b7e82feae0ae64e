"""Save a model and its tokenizer as one folder, optionally in half precision (half the size on disk).

Useful to ship a model to a machine without the alias package or the hub: training loads it back as float32
master weights (see `bertqa.model.build_model`), so only the storage is half precision.

  python scripts/pack_model.py --model minilm-l6 --dtype float16 --out gpu/minilm-fp16
"""

from __future__ import annotations

import shutil
from pathlib import Path

from bertqa.cli import run, script_parser, setup_logging

DTYPES = ("float32", "float16", "bfloat16")


def main(argv: list[str] | None = None) -> int:
    parser = script_parser(__doc__)
    parser.add_argument("--model", default="minilm-l6", help="model alias, local folder or hub id")
    parser.add_argument("--dtype", choices=DTYPES, default="float16", help="storage precision of the weights")
    parser.add_argument("--out", type=Path, required=True, help="folder to write")
    parser.add_flag("--overwrite", help="replace what --out holds (a model trained there would be lost)")
    args = parser.parse_args(argv)
    setup_logging()
    if args.out.exists() and (not args.out.is_dir() or any(args.out.iterdir())) and not args.overwrite:
        raise FileExistsError(f"{args.out} exists and is not empty; pass --overwrite to replace what it holds")
    import torch
    from transformers import AutoModel

    from bertqa.model import build_tokenizer, refuse_adapter, resolve_model

    refuse_adapter(args.model)
    # The encoder only (AutoModel), as the pretrained checkpoint is: a QA head is created fresh when training starts.
    model = AutoModel.from_pretrained(resolve_model(args.model), dtype=getattr(torch, args.dtype))
    tokenizer = build_tokenizer(args.model)  # both read before --out is cleared: it may be the folder packed
    if args.out.is_dir():  # files of what was there (bertqa.json, other weights) would describe another model
        shutil.rmtree(args.out)
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    size = sum(f.stat().st_size for f in args.out.iterdir()) / 2**20
    print(f"wrote {args.out} ({size:.1f} MiB, {args.dtype} weights)")
    return 0


if __name__ == "__main__":
    run(main)
