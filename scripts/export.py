"""Export a trained model to ONNX (optionally with int8 weights) for fast CPU answers and serving.

Examples:
  python scripts/export.py runs/quick/final_model runs/quick/onnx --format onnx
  python scripts/export.py runs/quick/final_model runs/quick/onnx-int8 --format onnx --quantize int8
  python scripts/export.py runs/quick/final_model runs/quick/onnx-plain --no-fuse   # for runtimes other than ORT

Needs the export extra: pip install -e ".[export]". The folder written holds model.onnx, the tokenizer, config.json
and bertqa.json (window settings, v2 flag, no-answer threshold, and the export's own check), so predict.py,
evaluate.py and serve.py take it like the model folder it came from. A model without bertqa.json (saved by plain
transformers, or a hub id) is exported with windows that fit it, as a SQuAD 1.1 model unless --v2 or --threshold
says it is a SQuAD 2.0 one; the export records which, so that it answers the same later.

The export checks itself before anything is written: both models run on real SQuAD dev windows. An fp32 export
whose logits differ from PyTorch's by more than 1e-3 is refused; for int8 the share of questions answered as
PyTorch fp32 answers them is reported (score it fully with evaluate.py).
"""

from __future__ import annotations

import argparse
import signal
from pathlib import Path

from bertqa.cli import positive_int, run, script_parser, setup_logging


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = script_parser(__doc__)
    parser.add_argument(
        "model",
        help="saved model folder (final_model/best_model of a run, or its adapter/), or any transformers QA model (a "
        "folder saved by plain transformers, a hub id)",
    )
    parser.add_argument("out", type=Path, help="folder to write the exported model to")
    parser.add_base_model()
    parser.add_argument("--format", default="onnx", choices=("onnx",), help="export format (default: %(default)s)")
    parser.add_argument(
        "--quantize",
        choices=("int8", "int8-partial"),
        help="int8 weights by ONNX Runtime's dynamic quantization (default: fp32). int8: every weight MatMul but "
        "attention's; int8-partial: also keeps each layer's FFN output fp32 (slower, closer to fp32; see "
        "docs/BENCHMARKS.md)",
    )
    parser.add_argument(
        "--check-data", help="questions to check the export on (default: the SQuAD dev set of the model's version)"
    )
    parser.add_argument(
        "--check-questions", type=positive_int, default=64, help="how many (default: %(default)s, seeded sample)"
    )
    parser.add_flag(
        "--fuse",
        default=True,
        help="use ONNX Runtime's faster fused operators; false (or --no-fuse) keeps the plain ONNX graph, which "
        "runs on any ONNX runtime",
    )
    parser.add_flag("--no-fuse", dest="fuse", negate=True, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    parser.add_version(threshold_default="the one saved with a v2 model, else 0 with --v2")
    parser.add_flag("--overwrite", help="replace an existing output folder")
    return parser.parse_args(argv)


def _stop(signum: int, frame: object) -> None:
    """SIGTERM: exit as a signal's exit code says, through the export's cleanup (no temporary folder is left)."""
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
    signal.signal(signal.SIGTERM, _stop)
    from bertqa.deploy.export import export_onnx

    report = export_onnx(
        args.model,
        args.out,
        quantize=args.quantize,
        check_data=args.check_data,
        check_questions=args.check_questions,
        fuse=args.fuse,
        overwrite=args.overwrite,
        base_model=args.base_model,
        v2=args.v2,
        threshold=args.threshold,
    )
    print(report.format())
    return 0


if __name__ == "__main__":
    run(main)
