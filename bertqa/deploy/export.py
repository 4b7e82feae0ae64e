"""Export a saved model to ONNX (optionally int8), as a complete folder to answer with, and check it against PyTorch.

The graph comes from PyTorch's own exporter (`torch.onnx.export`, the dynamo path: the older tracer freezes
transformers' shape-dependent attention masks and gives wrong logits) and int8 from ONNX Runtime's dynamic
quantization. Optimum's exporter would do the same but pins transformers below 5, which bertqa needs.

The exported folder holds `model.onnx`, the tokenizer, the model's `config.json` and `bertqa.json` (window
settings, v2 flag, no-answer threshold, and what the export was and how it checked), so
`bertqa.deploy.serving.Answerer`, `scripts/predict.py`, `scripts/evaluate.py` and `scripts/serve.py` take it like any
model folder.

The check runs both models on real windows (SQuAD dev questions by default) and compares logits and answers:
an fp32 export whose logits differ from PyTorch's by more than `FP32_TOLERANCE` is refused; int8 changes the logits
by design, so its check reports how many answers stay the same.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bertqa.card import write_card
from bertqa.deploy.backends import ONNX_FILE, OnnxQAModel

__all__ = ["FP32_TOLERANCE", "ExportCheckError", "ExportReport", "export_onnx"]

# Float32 ONNX Runtime and PyTorch differ by rounding only: about 1e-5 on a BERT's logits (measured 8.6e-6).
FP32_TOLERANCE = 1e-3
QUANTIZE = (None, "int8", "int8-partial")
EXTRA = 'pip install -e ".[export]" (onnx, onnxscript, onnxruntime)'


class ExportCheckError(ValueError):
    """The exported model does not compute what the PyTorch model computes."""


@dataclass(frozen=True)
class ExportReport:
    """What an export wrote and how closely the exported model follows PyTorch on the check questions."""

    source: str
    out: str
    quantize: str | None
    check_data: str
    questions: int
    windows: int
    max_abs_diff: float  # largest |logit difference| over the windows' real tokens
    same_answers: int  # questions whose answer is the same as PyTorch fp32's
    size_mib: float
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def format(self) -> str:
        kind = f"ONNX {self.quantize or 'fp32'}"
        share = self.same_answers / max(self.questions, 1)
        verdict = (
            f"within {FP32_TOLERANCE:g} of PyTorch's: the export matches"
            if self.quantize is None
            else "int8 changes them by design"
        )
        return (
            f"exported {self.source} to {self.out} ({kind}, {self.size_mib:.1f} MiB) in {self.seconds:.0f} s; "
            f"checked on {self.questions} questions of {self.check_data} ({self.windows} windows): logits differ by "
            f"at most {self.max_abs_diff:.2g} ({verdict}); same answer as PyTorch fp32 on {self.same_answers} of "
            f"{self.questions} ({100 * share:.1f}%)"
        )


def export_onnx(
    model_dir: str | Path,
    out: str | Path,
    *,
    quantize: str | None = None,
    check_data: str | None = None,
    check_questions: int = 64,
    fuse: bool = True,
    overwrite: bool = False,
    base_model: str | None = None,
    v2: bool | None = None,
    threshold: float | None = None,
) -> ExportReport:
    """Export the model folder `model_dir` to the folder `out` as ONNX (`quantize="int8"`: dynamic int8 weights),
    check it against PyTorch on `check_questions` questions of `check_data` (default: the SQuAD dev set of the
    model's version), and write the folder only if the check passes. `fuse` rewrites the graph with ONNX Runtime's
    fused operators (faster; off: a plain ONNX graph that other runtimes run too). An existing non-empty `out` is
    replaced only with `overwrite`; a LoRA adapter folder is put on its base (`base_model`, else the one it names).
    `v2` and `threshold` say how a model answers where its `bertqa.json` does not (any transformers QA model:
    `bertqa.deploy.settings`), and are recorded in the export's, so that it answers the same later."""
    out = Path(out)
    _refuse_before_work(model_dir, out, quantize=quantize, overwrite=overwrite)
    from bertqa.deploy.backends import load_checked
    from bertqa.deploy.settings import answer_settings
    from bertqa.model import build_tokenizer

    t0 = time.perf_counter()
    tokenizer = build_tokenizer(model_dir)
    settings, _ = answer_settings(model_dir, tokenizer, v2=v2, threshold=threshold)
    model, untrained = load_checked(model_dir, base_model=base_model)  # an adapter folder: on its base, merged
    check_data = check_data or ("dev-v2.0" if settings["v2"] else "dev-v1.1")
    examples, features, loader = _check_windows(check_data, check_questions, tokenizer, settings)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    _clear_stale(out)
    tmp.mkdir(parents=True)
    try:
        _write_onnx(model, next(iter(loader)), tmp / ONNX_FILE, quantize=quantize, fuse=fuse)
        check = _compare(model, OnnxQAModel(tmp / ONNX_FILE).eval(), examples, features, loader, settings)
        if quantize is None and check["max_abs_diff"] > FP32_TOLERANCE:
            raise _too_far(check["max_abs_diff"], check_data, out)
        report = ExportReport(
            source=str(model_dir),
            out=str(out),
            quantize=quantize,
            check_data=check_data,
            questions=len(examples),
            windows=len(features),
            max_abs_diff=check["max_abs_diff"],
            same_answers=check["same_answers"],
            size_mib=(tmp / ONNX_FILE).stat().st_size / 2**20,
            seconds=time.perf_counter() - t0,
        )
        _write_companions(model, tokenizer, model_dir, tmp, report, fuse=fuse, settings=settings, untrained=untrained)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return report


def _refuse_before_work(model_dir: str | Path, out: Path, *, quantize: str | None, overwrite: bool) -> None:
    """A quantization that does not exist, a mistyped model path or a run's folder, an output that would be
    overwritten unasked, the export libraries missing: each said before any work."""
    from bertqa.model import check_model_folder

    if quantize not in QUANTIZE:
        raise ValueError(f"quantize must be one of {QUANTIZE}, got {quantize!r}")
    check_model_folder(model_dir)  # before the output is checked
    _check_out(Path(model_dir), out, overwrite=overwrite)
    _require_export_libraries()


def _too_far(diff: float, check_data: str, out: Path) -> ExportCheckError:
    """An fp32 export whose logits are further from PyTorch's than rounding explains."""
    return ExportCheckError(
        f"the exported model's logits differ from PyTorch's by up to {diff:.3g} on {check_data} (tolerance "
        f"{FP32_TOLERANCE:g}); nothing was written to {out}"
    )


def _check_out(model_dir: Path, out: Path, *, overwrite: bool) -> None:
    """Refuse, before any work, an output that would replace the model being exported (or the folder holding it),
    a file, an existing folder without `overwrite`, a folder that cannot be written into, and an exported source."""
    from bertqa.deploy.backends import is_exported
    from bertqa.training.reporting import check_writable

    if is_exported(model_dir):
        raise ValueError(f"{model_dir} is already an exported model (it holds model.onnx); export the PyTorch folder")
    if (
        model_dir.exists()
        and out.exists()
        and (out.resolve() == model_dir.resolve() or out.resolve() in model_dir.resolve().parents)
    ):
        raise ValueError(f"{out} is (or holds) the model being exported, {model_dir}; choose another output folder")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} is a file; the export writes a folder")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} already exists; pass --overwrite (overwrite=True from Python) to replace it")
    check_writable(out.parent)


def _clear_stale(out: Path) -> None:
    """Remove temporary folders of earlier exports to `out` whose process is gone (killed mid-export)."""
    for tmp in out.parent.glob(f".{out.name}.tmp-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(out.with_name(f".{out.name}.tmp-{os.getpid()}"), ignore_errors=True)


def _require_export_libraries() -> None:
    for name in ("onnx", "onnxscript", "onnxruntime"):
        try:
            __import__(name)
        except ImportError as err:
            raise ImportError(f"exporting to ONNX needs {name}: {EXTRA}") from err


def _check_windows(source: str, count: int, tokenizer: Any, settings: dict[str, Any]) -> tuple[list, Any, Any]:
    """A seeded sample of `count` real questions, their windows and evaluation batches of 16."""
    from bertqa.data import Window, tokenize_examples
    from bertqa.inference import eval_batches
    from bertqa.sources import load_examples

    examples, _ = load_examples(source, max_examples=count, seed=0)
    features = tokenize_examples(examples, tokenizer, Window.from_dict(settings))
    if len(features) < 2:
        raise ValueError(f"{source} gives {len(features)} window(s); the export needs at least 2 to check against")
    return examples, features, eval_batches(features, batch_size=16, pad_token_id=tokenizer.pad_token_id)


def _write_onnx(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], path: Path, *, quantize: str | None, fuse: bool
) -> None:
    """Export with batch size and sequence length left free, from one batch of real windows (at least 2 rows, so
    the exporter does not specialise the batch size to 1); then fuse and quantize."""
    from bertqa.batching import model_inputs

    inputs = {k: v for k, v in model_inputs(batch).items() if k in ("input_ids", "attention_mask", "token_type_ids")}
    batch_dim, seq_dim = torch.export.Dim("batch"), torch.export.Dim("sequence")
    fp32_path = path.with_name("model_fp32.onnx") if quantize else path
    with _quiet():
        torch.onnx.export(
            model,
            (),
            str(fp32_path),
            kwargs=inputs,
            dynamo=True,
            external_data=False,
            verbose=False,
            input_names=list(inputs),
            output_names=["start_logits", "end_logits"],
            dynamic_shapes={k: {0: batch_dim, 1: seq_dim} for k in inputs},
        )
    if fuse:
        _fuse(fp32_path)
    if quantize is not None:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        # Dynamic quantization: int8 weights, activations quantized per batch at run time, so no calibration data.
        # Weights per output channel, MatMuls only: on the fused graph the attention operator (its Q, K, V
        # projections) stays fp32. On the quick MiniLM model and 1000 dev questions (2 cores): 1.9x PyTorch fp32
        # and -0.6 to -1.1 F1 (batches of 16 or 4 windows), where per-tensor weights kept only 63% of the answers.
        # "int8-partial" also keeps each layer's FFN output projection fp32, the MatMul that takes GELU's long-
        # tailed outputs, which one scale per batch quantizes worst: 1.5x and +0.4 F1 on the same questions.
        keep = _ffn_outputs(fp32_path) if quantize == "int8-partial" else []
        with _quiet():
            quantize_dynamic(
                str(fp32_path),
                str(path),
                weight_type=QuantType.QInt8,
                per_channel=True,
                op_types_to_quantize=["MatMul"],
                nodes_to_exclude=keep,
                extra_options={"MatMulConstBOnly": True},
            )
        fp32_path.unlink()


def _ffn_outputs(path: Path) -> list[str]:
    """The names of the MatMuls that take a GELU's output: each layer's FFN output projection."""
    import onnx

    graph = onnx.load(str(path)).graph
    made_by = {out: node.op_type for node in graph.node for out in node.output}
    gelus = ("Gelu", "BiasGelu", "FastGelu")
    return [n.name for n in graph.node if n.op_type == "MatMul" and made_by.get(n.input[0]) in gelus]


def _fuse(path: Path) -> None:
    """Rewrite the graph in place with ONNX Runtime's fused operators (attention, skip layer norm, bias GELU), by
    onnxscript's rewriter for graphs from PyTorch's exporter: the same arithmetic in fewer, faster kernels, which
    only ONNX Runtime runs."""
    import onnx_ir
    from onnxscript.rewriter.ort_fusions import optimize_for_ort

    with _quiet():
        fused, _ = optimize_for_ort(onnx_ir.load(str(path)))
        onnx_ir.save(fused, str(path))


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Hide the exporter's and quantizer's chatter: progress prints, a warning per torchvision op it skips, and an
    INFO line per tensor and initializer."""
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(logging.NOTSET)


def _compare(
    model: torch.nn.Module,
    exported: torch.nn.Module,
    examples: list,
    features: Any,
    loader: Any,
    settings: dict[str, Any],
) -> dict[str, Any]:
    """Both models' logits on the same windows: the largest difference on real tokens, and how many questions get
    the same answer (at the model's threshold for v2)."""
    from bertqa.inference import predict_logits
    from bertqa.postprocess import postprocess

    ref, got = predict_logits(model, loader), predict_logits(exported, loader)
    real = np.arange(ref[0].shape[1])[None, :] < np.asarray(features.lengths)[:, None]
    max_diff = max(float(np.abs(r - g)[real].max()) for r, g in zip(ref, got))
    length = settings["max_answer_length"]
    threshold = settings["no_answer_threshold"] if settings["v2"] else None
    answers = [postprocess(examples, features, start, end, max_answer_length=length) for start, end in (ref, got)]
    same = sum(answers[0][ex.id].answer(threshold) == answers[1][ex.id].answer(threshold) for ex in examples)
    return {"max_abs_diff": max_diff, "same_answers": same}


def _write_companions(
    model: torch.nn.Module,
    tokenizer: Any,
    model_dir: str | Path,
    folder: Path,
    report: ExportReport,
    *,
    fuse: bool,
    settings: dict[str, Any],
    untrained: str | None,
) -> None:
    """The tokenizer, the model's config and `bertqa.json`: the source's, with the settings it was answered with
    (a model without one: the windows that fit it, its version and threshold as asked), and what the export was."""
    import json

    import onnxruntime

    from bertqa.deploy.backends import saved_settings

    tokenizer.save_pretrained(folder)
    model.config.save_pretrained(folder)
    meta = {**(saved_settings(model_dir) or {}), **settings}
    source_eval = meta.pop("eval", None)  # the PyTorch model's scores: kept, but named as such
    meta["export"] = {
        "format": "onnx",
        "quantize": report.quantize,
        "fused": fuse,
        "from": report.source,
        "check": {k: v for k, v in report.to_dict().items() if k not in ("source", "out", "quantize")},
        "versions": {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__},
        "source_eval": source_eval,
        "untrained_head": untrained,  # said again wherever the export answers
    }
    (folder / "bertqa.json").write_text(json.dumps(meta, indent=2) + "\n")
    write_card(folder, meta, kind="export", ref=report.out)  # `folder` is renamed to `report.out` once checked
