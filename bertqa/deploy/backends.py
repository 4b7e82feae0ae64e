"""What runs a saved model's windows: PyTorch (a model folder) or ONNX Runtime (a folder `scripts/export.py` wrote).

Both give the same thing to the one logits loop (`bertqa.inference.predict_logits`): a module whose forward takes
the windows' token tensors and returns start/end logits. So answering and scoring an exported model go through the
same windows, exhaustive span search and threshold as a PyTorch one; only the matrix arithmetic differs.
ONNX Runtime is an optional extra (`pip install -e ".[export]"`), imported only when an exported folder is loaded.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from bertqa.data import Window

__all__ = [
    "DEFAULT_SETTINGS",
    "ONNX_FILE",
    "OnnxQAModel",
    "backend_name",
    "is_exported",
    "load_checked",
    "load_qa_model",
    "load_settings",
    "precision_for",
    "saved_settings",
    "untrained_head",
]

logger = logging.getLogger("bertqa")
ONNX_FILE = "model.onnx"
SETTINGS_FILE = "bertqa.json"
EXTRA = 'pip install -e ".[export]" (onnxruntime)'

# What a model folder without bertqa.json (e.g. a plain hub checkpoint) is used with.
DEFAULT_SETTINGS: dict[str, Any] = {
    **Window().to_dict(),
    "max_answer_length": 30,
    "v2": False,
    "no_answer_threshold": None,
    # How scores become probabilities (`bertqa.postprocess.Calibration`, chosen with the threshold; these: as given).
    "temperature": 1.0,
    "no_answer_scale": 1.0,
    "no_answer_shift": 0.0,
    "threshold_calibrated_on": None,  # v2 models: where the threshold was chosen ({"source", "questions"})
    "eval_data": None,
    "eval_rule": None,  # a held-out evaluation share: the `run_examples` arguments that draw it again
    "column_map": None,
    "eval_column_map": None,  # how the evaluation data was read: its own column map, or the training data's
    "skip_bad_records": False,
    "export": None,  # exported folders: format, quantization and the parity check (`bertqa.deploy.export`)
}


def load_settings(model_dir: str | Path) -> dict[str, Any]:
    """The window settings and no-answer threshold saved next to a model by training, else the defaults."""
    return with_defaults(saved_settings(model_dir))


def with_defaults(saved: dict[str, Any] | None) -> dict[str, Any]:
    """The answering settings among `saved` (a `bertqa.json`), the defaults for the rest."""
    return {**DEFAULT_SETTINGS, **{k: v for k, v in (saved or {}).items() if k in DEFAULT_SETTINGS}}


def saved_settings(model_dir: str | Path) -> dict[str, Any] | None:
    """The `bertqa.json` saved with a model, whole; None for a model bertqa did not train. A hub id's is read from
    the hub's cache, else from the hub where it can be reached: a bertqa model pushed there answers as it was
    scored."""
    from bertqa.hub import hub_file
    from bertqa.model import is_hub_id

    local = Path(model_dir).expanduser()
    found = hub_file(str(model_dir), SETTINGS_FILE) if is_hub_id(str(model_dir)) else local / SETTINGS_FILE
    return json.loads(Path(found).read_text()) if found is not None and Path(found).is_file() else None


def is_exported(model_dir: str | Path) -> bool:
    """Whether `model_dir` is an exported (ONNX) model folder."""
    return (Path(model_dir) / ONNX_FILE).is_file()


def backend_name(model_dir: str | Path, *, bf16: bool = False) -> str:
    """A short name of what answers: torch-fp32, torch-bf16, onnx-fp32, onnx-int8 or onnx-int8-partial."""
    if is_exported(model_dir):
        export = load_settings(model_dir)["export"] or {}  # what the export recorded in bertqa.json
        return f"onnx-{export.get('quantize') or 'fp32'}"
    return "torch-bf16" if bf16 else "torch-fp32"


def precision_for(model_dir: str | Path, precision: str) -> str:
    """The precision to run `model_dir` in: as asked for a PyTorch folder; "no" for an exported one, which runs in
    the precision it was exported in (asking it for bf16 is refused)."""
    if not is_exported(model_dir):
        return precision
    if precision == "bf16":
        raise ValueError(
            f"{model_dir} is an exported model: it runs in the precision it was exported in, not bf16 "
            "(pass precision 'auto' or 'no')"
        )
    return "no"


class OnnxQAModel(torch.nn.Module):
    """An ONNX Runtime session that looks like a question-answering model to the logits loop: `forward` takes the
    token tensors (those the graph has; DistilBERT has no token_type_ids) and returns start/end logits as tensors.

    It has no parameters to train; `threads` defaults to torch's thread count, so OMP_NUM_THREADS and
    `accelerate launch --num_cpu_threads_per_process` hold for it too.
    """

    def __init__(self, path: str | Path, *, threads: int | None = None, device: str = "cpu") -> None:
        super().__init__()
        try:
            import onnxruntime as ort
        except ImportError as err:
            raise ImportError(f"{path} is an exported ONNX model; running it needs {EXTRA}") from err
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.log_severity_level = 3  # errors only: its warnings about unused initializers are noise to a user
        providers = ["CPUExecutionProvider"]
        if device.startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        self.session = ort.InferenceSession(str(path), options, providers=providers)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    @property
    def device(self) -> torch.device:
        # Inputs are handed to ONNX Runtime as NumPy arrays, so they are wanted on the CPU whatever it runs on.
        return torch.device("cpu")

    def forward(self, **inputs: torch.Tensor) -> Any:
        from transformers.modeling_outputs import QuestionAnsweringModelOutput

        missing = [name for name in self.input_names if name not in inputs]
        if missing:
            raise ValueError(f"the exported model needs inputs {missing}; it was given {sorted(inputs)}")
        feed = {name: inputs[name].detach().cpu().numpy().astype("int64") for name in self.input_names}
        start, end = self.session.run(self.output_names, feed)
        return QuestionAnsweringModelOutput(start_logits=torch.from_numpy(start), end_logits=torch.from_numpy(end))


def load_qa_model(model_dir: str | Path, *, device: str = "cpu", base_model: str | None = None) -> torch.nn.Module:
    """The model of a folder to answer with, in evaluation mode: ONNX Runtime for an exported folder, else the
    PyTorch model on `device` (a LoRA adapter folder on its base, or `base_model`: `bertqa.adapters.load_trained`).
    A QA head that looks untrained is said loudly (`load_checked`)."""
    return load_checked(model_dir, device=device, base_model=base_model)[0]


def load_checked(
    model_dir: str | Path, *, device: str = "cpu", base_model: str | None = None
) -> tuple[torch.nn.Module, str | None]:
    """`load_qa_model`, and why its QA head looks never trained (None: it does not; `untrained_head`). That is
    said in the log as a warning before the model answers anything: its answers would be noise that looks like
    answers. An exported folder says what its export found."""
    if is_exported(model_dir):
        if base_model is not None:
            raise ValueError(
                f"{model_dir} is an exported model, not a LoRA adapter: a base model is for adapter folders"
            )
        model: torch.nn.Module = OnnxQAModel(Path(model_dir) / ONNX_FILE, device=device).eval()
        untrained = (load_settings(model_dir)["export"] or {}).get("untrained_head")
    else:
        model, missing = _load_torch(model_dir, base_model=base_model)
        untrained = untrained_head(model, missing, trained_steps=_trained_steps(saved_settings(model_dir)))
        model = model.to(device).eval()
    if untrained is not None:
        logger.warning(
            "UNTRAINED QA HEAD: %s %s. Its answers are noise until it is fine-tuned for question answering "
            "(scripts/train.py --model %s)",
            *(model_dir, untrained, model_dir),
        )
    return model, untrained


def _load_torch(model_dir: str | Path, *, base_model: str | None) -> tuple[torch.nn.Module, set[str]]:
    """The PyTorch model of a folder, alias or hub id, and the weights its checkpoint lacked (transformers
    initialised them). transformers' own report of them is left out: `load_checked` says what they mean."""
    from bertqa.adapters import load_trained
    from bertqa.model import is_adapter_folder, load_pretrained, quiet_transformers

    if base_model is not None or is_adapter_folder(model_dir):
        return load_trained(model_dir, base_model=base_model), set()  # the head comes with the adapter
    from transformers import AutoModelForQuestionAnswering

    with quiet_transformers():
        model, info = load_pretrained(
            "model",
            AutoModelForQuestionAnswering.from_pretrained,
            str(model_dir),
            dtype=torch.float32,
            output_loading_info=True,
        )
    missing = set(info["missing_keys"])
    prefix = f"{model.base_model_prefix}."
    encoder = sorted(key for key in missing if key.startswith(prefix))
    if encoder:
        logger.warning(
            "%s: %d of its encoder's weights are not in its checkpoint and were initialised at random (%s%s)",
            *(model_dir, len(encoder), ", ".join(encoder[:3]), ", ..." if len(encoder) > 3 else ""),
        )
    return model, missing


def _trained_steps(saved: dict[str, Any] | None) -> int:
    """How many updates bertqa trained a model for, as its `bertqa.json` records (0: not recorded)."""
    record = (saved or {}).get("eval")
    step = record.get("step") if isinstance(record, dict) else None
    return step if isinstance(step, int) else 0


def untrained_head(model: torch.nn.Module, missing: set[str], *, trained_steps: int = 0) -> str | None:
    """Why `model`'s QA head looks never trained, or None. Two tells: its weights were not in the checkpoint
    (`missing`: a base encoder loaded for question answering, whose head transformers made up), or every bias of
    the head is exactly zero, as transformers initialises it (a base encoder saved with its fresh head). Training
    moves a bias off zero in its first updates, though not always both of them (the loss barely depends on a
    bias added to every position), so a model whose `bertqa.json` records updates (`trained_steps`) is believed."""
    prefix = f"{getattr(model, 'base_model_prefix', '')}."
    head = sorted(key for key in missing if not key.startswith(prefix))
    if head:
        return (
            f"has no trained QA head: {', '.join(head)} are not in its checkpoint (a base encoder, not a "
            "question-answering model), so they were initialised at random"
        )
    if trained_steps > 0 or prefix == ".":
        return None
    biases = [p for name, p in model.named_parameters() if not name.startswith(prefix) and name.endswith("bias")]
    if biases and not any(bool(p.detach().any()) for p in biases):
        return (
            "has a QA head as transformers initialises it, never trained: its bias is exactly zero, which "
            "training moves"
        )
    return None
