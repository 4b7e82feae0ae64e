"""What runs a saved model's windows: PyTorch (a model folder) or ONNX Runtime (a folder `scripts/export.py` wrote).

Both give the same thing to the one logits loop (`bertqa.inference.predict_logits`): a module whose forward takes
the windows' token tensors and returns start/end logits. So answering and scoring an exported model go through the
same windows, exhaustive span search and threshold as a PyTorch one; only the matrix arithmetic differs.
ONNX Runtime is an optional extra (`pip install -e ".[export]"`), imported only when an exported folder is loaded.
"""

from __future__ import annotations

import json
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
    "load_qa_model",
    "load_settings",
    "precision_for",
]

ONNX_FILE = "model.onnx"
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
    path = Path(model_dir) / "bertqa.json"
    saved = json.loads(path.read_text()) if path.is_file() else {}
    return {**DEFAULT_SETTINGS, **{k: v for k, v in saved.items() if k in DEFAULT_SETTINGS}}


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
    PyTorch model on `device` (a LoRA adapter folder on its base, or `base_model`: `bertqa.adapters.load_trained`)."""
    if is_exported(model_dir):
        if base_model is not None:
            raise ValueError(
                f"{model_dir} is an exported model, not a LoRA adapter: a base model is for adapter folders"
            )
        return OnnxQAModel(Path(model_dir) / ONNX_FILE, device=device).eval()
    from bertqa.adapters import load_trained

    return load_trained(model_dir, base_model=base_model).to(device).eval()
