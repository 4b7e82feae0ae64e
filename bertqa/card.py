"""What made a model, and the card that says it: the `trained` record in `bertqa.json` (base model, data and how it
was split, the command, precision, hardware, the label self-check, versions, the data's licence) and the `README.md`
model card beside every saved model, written with `huggingface_hub.ModelCard`.

The card's YAML header is what the Hub reads (base model, datasets, licence, tags, a `model-index` with the scores
of the evaluation the model was saved after, exactly as in `metrics.jsonl`); its prose is what a person reads. Both
come from `bertqa.json` alone (`card_text`), so a card can be written again for any saved folder.
"""

from __future__ import annotations

import contextlib
import os
import platform
import shlex
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "CARD_FILE",
    "HUB_BASES",
    "SQUAD_LICENCE",
    "base_licence",
    "card_text",
    "data_licence",
    "hardware",
    "provenance",
    "write_card",
]

CARD_FILE = "README.md"
SQUAD_LICENCE = "CC BY-SA 4.0"
SQUAD_CREDIT = f"SQuAD (Rajpurkar et al.), {SQUAD_LICENCE}"
# The Hub's ids for what bertqa names by alias or bundles: the card's metadata links to them.
HUB_BASES = {"minilm-l6": "sentence-transformers/all-MiniLM-L6-v2"}
_SQUAD_HUB = {"train-v1.1": "rajpurkar/squad", "dev-v1.1": "rajpurkar/squad", "dev-v2.0": "rajpurkar/squad_v2"}
_SQUAD_IDS = {"squad": "rajpurkar/squad", "squad_v2": "rajpurkar/squad_v2"} | {v: v for v in _SQUAD_HUB.values()}


def _parts(source: str) -> list[str]:
    """The sources joined in `source` ("a+b"), each without an article range ("dev-v2.0[:25]" -> "dev-v2.0")."""
    from bertqa.sources import source_parts, split_article_range

    return [str(split_article_range(part)[0]) for part in source_parts(source)]


def _squad_id(source: str) -> str | None:
    """The Hub dataset a SQuAD source is (a bundled name, a bundled file, a hub id), else None."""
    from bertqa.loading import BUNDLED

    if source in _SQUAD_HUB:
        return _SQUAD_HUB[source]
    if source.partition(":")[0] in _SQUAD_IDS:  # a hub id, with or without a split ("squad:validation")
        return _SQUAD_IDS[source.partition(":")[0]]
    with contextlib.suppress(OSError):
        if Path(source).exists():  # a bundled file by its path
            found = Path(source).resolve()
            return next((_SQUAD_HUB[name] for name, path in BUNDLED.items() if path.resolve() == found), None)
    return None


def data_licence(*sources: str | None) -> str | None:
    """The licence of the data a model was trained and evaluated on, where every part of it is known (SQuAD:
    CC BY-SA 4.0); None when any part is the user's own (its licence is theirs to state)."""
    parts = [part for source in sources if source for part in _parts(source)]
    return SQUAD_CREDIT if parts and all(_squad_id(part) for part in parts) else None


def base_licence(base: str | None) -> str | None:
    """The licence a base model's own card declares (its README.md: a local folder, an alias, or a hub id found in
    the hub's cache, or on the hub where it answers); None where there is no card to read."""
    if not base:
        return None
    from huggingface_hub import ModelCard

    from bertqa.model import ModelNotFoundError, resolve_model

    try:
        folder = Path(resolve_model(base)).expanduser()
    except ModelNotFoundError:
        return None
    try:
        if folder.is_dir():
            card = ModelCard.load(folder / CARD_FILE) if (folder / CARD_FILE).is_file() else None
        else:
            card = _hub_card(base)
    except Exception:  # a card that cannot be read says nothing about the licence; training goes on
        return None
    return getattr(getattr(card, "data", None), "license", None)


def _hub_card(repo_id: str) -> Any:
    """A hub model's card: from the hub's cache, else the hub when it can be reached (None otherwise)."""
    from huggingface_hub import ModelCard

    from bertqa.hub import hub_file

    path = hub_file(repo_id, CARD_FILE)
    return ModelCard.load(path) if path is not None else None


def hardware(device_type: str, processes: int) -> str:
    """What trained the model, in words: "1 process on AMD EPYC 9R14 (2 cores)", "8 processes on NVIDIA H100"."""
    import torch

    if device_type == "cuda" and torch.cuda.is_available():
        name = torch.cuda.get_device_name()
    else:
        name = f"{_cpu_name()} ({os.cpu_count()} cores)"
    return f"{processes} process{'es' if processes > 1 else ''} on {name}"


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "a CPU"


def command(processes: int) -> str:
    """The command line that started this process, as a person would type it again."""
    start = ["accelerate", "launch", "--num_processes", str(processes)] if processes > 1 else ["python"]
    return shlex.join([*start, *sys.argv])


def provenance(
    config: Mapping[str, Any],
    *,
    examples: Any,
    labels: Any,
    precision: str,
    device_type: str,
    processes: int,
    base_model: str | None,
) -> dict[str, Any]:
    """The `trained` record of `bertqa.json`: what made the model, beside its settings. `config` is the run's
    `TrainConfig.to_dict()`, `examples` its `RunExamples`, `labels` the label self-check's `LabelReport`."""
    import torch
    import transformers

    from bertqa import __version__
    from bertqa.config import BOOKKEEPING, TrainConfig

    defaults = TrainConfig().to_dict()
    # What the model depends on: not where the run wrote, how often it saved, whether it resumed (`BOOKKEEPING`)
    return {
        "bertqa_version": __version__,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "command": command(processes),
        "settings": {k: v for k, v in config.items() if k in defaults and defaults[k] != v and k not in BOOKKEEPING},
        "base_model_licence": base_licence(base_model),
        "train_data": examples.train_data or "examples passed to fit",
        "train_questions": len(examples.train),
        "eval_data": examples.eval_data or examples.train_data or "examples passed to fit",  # where they came from
        "eval_split": examples.eval_described,
        "eval_questions": len(examples.eval),
        "data_licence": data_licence(examples.train_data, examples.eval_data),
        "precision": _precision(precision),
        "hardware": hardware(device_type, processes),
        "label_check": {"labelled": labels.n_labelled, "decoded_to_gold": labels.n_match},
        "seed": config.get("seed"),
    }


def write_card(folder: str | Path, settings: Mapping[str, Any], *, kind: str = "model", ref: str | None = None) -> None:
    """Write `README.md`, the model card of a saved `folder` ("model", "adapter" or "export"), from its
    `bertqa.json` `settings`; `ref` is how the card's code loads it (default: the folder as given)."""
    from huggingface_hub import ModelCard

    ModelCard(card_text(settings, kind=kind, ref=ref or str(folder))).save(Path(folder) / CARD_FILE)


def card_text(settings: Mapping[str, Any], *, kind: str = "model", ref: str = "path/to/model") -> str:
    """The model card of a saved model (YAML metadata, then prose), from its `bertqa.json` settings alone."""
    sections = [_title(settings, kind), _results(settings, kind), _training(settings), _use(settings, kind, ref)]
    prose = "\n\n".join(part for part in (*sections, _limits(settings), _licence(settings)) if part)
    return f"---\n{_metadata(settings, kind).to_yaml()}\n---\n\n{prose}\n"


# -- metadata: what the Hub reads ---------------------------------------------------------------------------------


def _hub_base(base: str | None) -> str | None:
    """The base model as a Hub id (an alias by its Hub id); None for a local folder, which the Hub cannot link."""
    from bertqa.model import is_hub_id

    if not base:
        return None
    return HUB_BASES[base] if base in HUB_BASES else base if is_hub_id(base) else None


def _datasets(trained: Mapping[str, Any]) -> list[str]:
    """The Hub datasets a model was trained and evaluated on (SQuAD's; a user's own files have none)."""
    found = [_squad_id(part) for key in ("train_data", "eval_data") for part in _parts(str(trained.get(key) or ""))]
    return list(dict.fromkeys(f for f in found if f))


def _metadata(settings: Mapping[str, Any], kind: str) -> Any:
    from huggingface_hub import ModelCardData

    trained = settings.get("trained") or {}
    datasets = _datasets(trained)
    tags = ["bertqa", "question-answering", "extractive-qa", *(d.split("/")[-1] for d in datasets)]
    tags += {"adapter": ["lora", "peft"], "export": ["onnx"]}.get(kind, [])
    record = settings.get("eval") if kind != "export" else None
    return ModelCardData(
        base_model=_hub_base(settings.get("base_model")),
        datasets=datasets or None,
        language="en" if datasets else None,
        license=trained.get("base_model_licence"),
        library_name="peft" if kind == "adapter" else ("onnx" if kind == "export" else "transformers"),
        pipeline_tag="question-answering",
        tags=list(dict.fromkeys(tags)),
        eval_results=_eval_results(record, trained, v2=bool(settings.get("v2")), threshold=_threshold(settings))
        or None,
        model_name=_name(settings),
    )


# What a model-index lists, by the record's key: (metric type, shown name).
_V1_METRICS = {"exact": ("exact_match", "EM"), "f1": ("f1", "F1")}
_V2_METRICS = {"HasAns_f1": ("f1", "HasAns F1"), "NoAns_f1": ("f1", "NoAns F1")}


def _eval_results(
    record: Mapping[str, Any] | None, trained: Mapping[str, Any], *, v2: bool, threshold: float | None
) -> list[Any]:
    """The model-index entries: the scores of the evaluation the model was saved after, as recorded."""
    from huggingface_hub import EvalResult

    if not record:
        return []
    eval_data = str(trained.get("eval_data") or "evaluation data")
    parts = _parts(eval_data)
    dataset = {
        "dataset_type": _squad_id(parts[0]) or Path(parts[0]).name,
        "dataset_name": f"{trained.get('eval_split') or eval_data} ({record.get('total', 0):,.0f} questions)",
        "dataset_split": "validation"
        if any(p.startswith("dev-") or p.endswith(":validation") for p in parts)
        else None,
    }
    task = {"task_type": "question-answering", "task_name": "Extractive question answering"}
    metrics = {**_V1_METRICS, **(_V2_METRICS if v2 else {})}
    results = [
        EvalResult(**task, **dataset, metric_type=kind, metric_name=name, metric_value=record[key])
        for key, (kind, name) in metrics.items()
        if record.get(key) is not None
    ]
    if v2 and threshold is not None:
        results.append(
            EvalResult(
                **task, **dataset, metric_type="threshold", metric_name="no-answer threshold", metric_value=threshold
            )
        )
    return results


# -- prose: what a person reads -------------------------------------------------------------------------------------


def _scores(settings: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The evaluation record the model was saved after; for an export, its source's (which the export keeps)."""
    return settings.get("eval") or (settings.get("export") or {}).get("source_eval")


def _threshold(settings: Mapping[str, Any]) -> float | None:
    return settings.get("no_answer_threshold") if settings.get("v2") else None


def _name(settings: Mapping[str, Any]) -> str:
    base = settings.get("base_model")
    return (
        f"{Path(base).name} fine-tuned for extractive question answering" if base else "Extractive question answering"
    )


def _base_link(base: str | None) -> str:
    hub = _hub_base(base)
    if hub:
        return f"[{hub}](https://huggingface.co/{hub})" + (f" (bertqa's `{base}`)" if base in HUB_BASES else "")
    return f"`{base}`" if base else "a model passed to bertqa (its name was not recorded)"


def _title(settings: Mapping[str, Any], kind: str) -> str:
    answers = "points at the span of the passage that answers it"
    if settings.get("v2"):
        answers += ', or says "no answer" when the passage holds none (SQuAD 2.0)'
    what = {
        "model": "An extractive question-answering model",
        "adapter": "A LoRA adapter (peft) for extractive question answering",
        "export": "An ONNX export of an extractive question-answering model",
    }[kind]
    line = f"{what}: given a question and a passage, it {answers}."
    if settings.get("trained") or settings.get("base_model"):  # trained by bertqa (a third-party model is not)
        line += f" Fine-tuned from {_base_link(settings.get('base_model'))} with bertqa."
    lora = ((settings.get("trained") or {}).get("settings") or {}).get("lora_r")
    if lora and kind == "model":
        line += (
            f" Trained with LoRA (r={lora}): the adapters are merged into these weights; `adapter/` holds them alone."
        )
    untrained = (settings.get("export") or {}).get("untrained_head")
    if untrained:
        line += (
            f"\n\n**Its QA head looks never trained**: it {untrained}. Its answers are noise until it is fine-tuned."
        )
    return f"# {_name(settings)}\n\n{line}"


def _pct(value: Any) -> str:
    return "-" if value is None else f"{value:.2f}"


def _results(settings: Mapping[str, Any], kind: str) -> str:
    """The scores of the evaluation the model was saved after (for an export: its source's, and the export check)."""
    export = settings.get("export") or {}
    record = _scores(settings)
    trained = settings.get("trained") or {}
    check = f"\n\n{_export_check(export)}" if kind == "export" else ""
    if not record:
        return f"## Results\n\nNo evaluation is recorded with this model.{check}"
    where = trained.get("eval_split") or trained.get("eval_data") or "its evaluation data"
    rows = [("EM", record.get("exact")), ("F1", record.get("f1"))]
    if settings.get("v2"):
        rows += [("HasAns F1", record.get("HasAns_f1")), ("NoAns F1", record.get("NoAns_f1"))]
        rows += [("no-answer threshold", _threshold(settings))]
    table = "\n".join(["| metric | value |", "|---|---|", *(f"| {name} | {_pct(v)} |" for name, v in rows)])
    whose = "The PyTorch model it was exported from scored" if kind == "export" else "Scored"
    text = (
        f"## Results\n\n{whose} at update {record.get('step', '?')} on {where} ({record.get('total', 0):,.0f} "
        f"questions), with the official SQuAD {'2.0' if settings.get('v2') else '1.1'} EM and F1:\n\n{table}"
    )
    return text + check


def _export_check(export: Mapping[str, Any]) -> str:
    check = export.get("check") or {}
    questions = check.get("questions", 0)
    return (
        f"The export check ran PyTorch and ONNX Runtime ({export.get('quantize') or 'fp32'}) on {questions} questions "
        f"of {check.get('check_data', '?')} ({check.get('windows', '?')} windows): logits differ by at most "
        f"{check.get('max_abs_diff', float('nan')):.2g}; {check.get('same_answers', '?')} of {questions} answers are "
        f"the same as PyTorch fp32's. Exported from `{export.get('from', '?')}`."
    )


def _training(settings: Mapping[str, Any]) -> str:
    trained = settings.get("trained")
    if not trained:
        return "## Training\n\nThis folder does not record how the model was trained."
    record = _scores(settings) or {}
    labels = trained.get("label_check") or {}
    checked = labels.get("labelled") or 0
    share = f" ({100 * labels.get('decoded_to_gold', 0) / checked:.2f}%)" if checked else ""
    lines = [
        f"- Data: {trained['train_data']} ({trained.get('train_questions', 0):,} training questions); evaluated on "
        f"{_evaluated_on(settings)}.",
        f"- Label self-check before training: {labels.get('decoded_to_gold', 0):,} of {checked:,} in-window answer "
        f"labels decode back to the gold answer text{share}.",
        f"- Command: `{trained.get('command')}`",
        f"- Settings other than bertqa's defaults: {_settings(trained.get('settings') or {})}.",
        f"- Precision {_precision(trained.get('precision'))}, on {trained.get('hardware')}; "
        f"{record.get('step', '?')} optimizer updates in {_duration(record.get('train_time_s'))} of training"
        f"{_memory(record)}.",
        f"- bertqa {trained.get('bertqa_version')}, "
        + ", ".join(f"{k} {v}" for k, v in (trained.get("versions") or {}).items())
        + f"; seed {trained.get('seed')}.",
    ]
    if settings.get("v2"):
        lines.append(_threshold_line(settings))
    return "## Training\n\n" + "\n".join(lines)


def _evaluated_on(settings: Mapping[str, Any]) -> str:
    """The evaluation questions in words: a held-out share as `bertqa.json` says it (how many were scored too)."""
    trained = settings.get("trained") or {}
    if settings.get("eval_rule") and settings.get("eval_data"):
        return str(settings["eval_data"])
    return f"{trained.get('eval_split')} ({trained.get('eval_questions', 0):,} questions)"


def _memory(record: Mapping[str, Any]) -> str:
    mib = record.get("peak_memory_mib")
    where = "GPU memory" if record.get("peak_memory_of") == "gpu_max_allocated" else "memory"
    return f", peak {where} {mib / 1024:.2f} GiB" if isinstance(mib, (int, float)) else ""


def _precision(name: Any) -> str:
    return "fp32" if name == "no" else str(name)  # Accelerate's "no" mixed precision is plain fp32


def _settings(changed: Mapping[str, Any]) -> str:
    return ", ".join(f"`{k}={v}`" for k, v in changed.items()) or "none"


def _duration(seconds: Any) -> str:
    from bertqa.config import format_duration

    return format_duration(float(seconds)) if isinstance(seconds, (int, float)) else "an unrecorded time"


def _threshold_line(settings: Mapping[str, Any]) -> str:
    on = settings.get("threshold_calibrated_on") or {}
    return (
        f'- No-answer threshold {_pct(_threshold(settings))}: a question is answered "no answer" when that '
        f"score beats the best span's by more than it; chosen on {on.get('source', 'data not recorded')} "
        f"({on.get('questions', 0):,} questions)."
    )


def _use(settings: Mapping[str, Any], kind: str, ref: str) -> str:
    """How to load it: with bertqa (the same windows, span search and threshold as scored), and without."""
    window = f"`max_seq_length={settings.get('max_seq_length')}`, `doc_stride={settings.get('doc_stride')}`"
    text = (
        f"## How to use\n\nWith bertqa, which answers as the model was scored (windows of {window}, every span of "
        "every window searched, the no-answer threshold and calibration saved in `bertqa.json`), on PyTorch or, for "
        "an exported folder, ONNX Runtime:\n\n"
        f'```python\nfrom bertqa.deploy.serving import Answerer\n\nMODEL = "{ref}"  # this folder, or the Hub id it '
        'was pushed to\nanswerer = Answerer(MODEL)\nprint(answerer([{"question": "Who wrote the book?", "context": '
        '"The book was written by Ann Lee in 1990."}]))\n```\n\n'
        "or `python scripts/predict.py MODEL -q QUESTION -c CONTEXT`, `scripts/evaluate.py`, `scripts/serve.py`."
    )
    return text + "\n\n" + {"model": _plain, "adapter": _peft, "export": _onnx}[kind](settings, ref)


def _plain(settings: Mapping[str, Any], ref: str) -> str:
    longest = settings.get("max_answer_length") or 30
    return (
        "With plain transformers (the folder is a `save_pretrained` model; this short version reads the first window "
        f"only, and takes the best span of at most {longest} tokens of the passage"
        f"{', never no answer: bertqa applies the threshold' if settings.get('v2') else ''}):\n\n"
        "```python\nimport torch\nfrom transformers import AutoModelForQuestionAnswering, AutoTokenizer\n\n"
        f'MODEL = "{ref}"\ntokenizer = AutoTokenizer.from_pretrained(MODEL)\n'
        "model = AutoModelForQuestionAnswering.from_pretrained(MODEL).eval()\n"
        'question, context = "Who wrote the book?", "The book was written by Ann Lee in 1990."\n'
        "inputs = tokenizer(\n"
        f'    question, context, truncation="only_second", max_length={settings.get("max_seq_length")}, '
        'return_tensors="pt", return_offsets_mapping=True\n)\noffsets = inputs.pop("offset_mapping")[0]\n'
        "with torch.no_grad():\n    out = model(**inputs)\n"
        "in_context = torch.tensor([part == 1 for part in inputs.sequence_ids(0)])\n"
        "n = len(in_context)  # spans start <= end < start + the longest answer, both in the passage\n"
        f"allowed = torch.ones(n, n, dtype=torch.bool).triu().tril({longest - 1}) & in_context[:, None] & in_context\n"
        "scores = out.start_logits[0][:, None] + out.end_logits[0][None, :]\n"
        'start, end = divmod(int(scores.masked_fill(~allowed, float("-inf")).argmax()), n)\n'
        "print(context[offsets[start][0] : offsets[end][1]])\n```"
    )


def _peft(settings: Mapping[str, Any], ref: str) -> str:
    base = _hub_base(settings.get("base_model")) or settings.get("base_model")
    return (
        f"This folder holds the adapter alone; it goes on its base model, `{base}`"
        f"{' (cut to its first layers as trained: `num_layers` in bertqa.json)' if settings.get('num_layers') else ''}"
        ". The folder above it holds the model with the adapter merged in, a plain transformers model. With peft:\n\n"
        "```python\nfrom peft import PeftModel\nfrom transformers import AutoModelForQuestionAnswering\n\n"
        f'MODEL = "{ref}"\nbase = AutoModelForQuestionAnswering.from_pretrained("{base}")\n'
        "model = PeftModel.from_pretrained(base, MODEL).merge_and_unload().eval()\n```"
    )


def _onnx(settings: Mapping[str, Any], ref: str) -> str:
    export = settings.get("export") or {}
    return (
        f"`model.onnx` ({export.get('quantize') or 'fp32'}) takes the tokenizer's `input_ids`, `attention_mask` (and "
        "`token_type_ids` where the model has them) and gives `start_logits` and `end_logits`. With ONNX Runtime "
        "alone, from a local copy of the folder:\n\n"
        "```python\nimport onnxruntime\nfrom transformers import AutoTokenizer\n\n"
        f'MODEL = "{ref}"\ntokenizer = AutoTokenizer.from_pretrained(MODEL)\n'
        'session = onnxruntime.InferenceSession(f"{MODEL}/model.onnx")\n'
        'inputs = tokenizer("Who wrote the book?", "The book was written by Ann Lee in 1990.", return_tensors="np")\n'
        "start_logits, end_logits = session.run(None, {i.name: inputs[i.name] for i in session.get_inputs()})\n```"
    )


def _limits(settings: Mapping[str, Any]) -> str:
    trained = settings.get("trained") or {}
    scored = _scores(settings)
    where = trained.get("eval_split") or trained.get("eval_data") or "its own evaluation data"
    lines = [
        f"- Scored only on {where}: how it does on other domains, on other languages, on questions written "
        "differently or on passages longer than a few windows was not measured."
        if scored
        else "- No evaluation is recorded with it: score it on data like yours (`scripts/evaluate.py`) before "
        "relying on it.",
        "- It answers with a span of the passage given, never with text of its own; answers longer than "
        f"{settings.get('max_answer_length')} tokens are not proposed.",
    ]
    if not settings.get("v2"):
        lines.append(
            "- It was trained on questions that all have an answer in the passage: it always answers, even "
            "when the passage holds none."
        )
    return "## Limits\n\n" + "\n".join(lines)


def _licence(settings: Mapping[str, Any]) -> str:
    trained = settings.get("trained") or {}
    base = trained.get("base_model_licence")
    data = trained.get("data_licence")
    model = f"the base model's licence, {base}" if base else "the base model's licence (not recorded: see its card)"
    data_line = f"the training data: {data}" if data else "the training data's licence is not recorded"
    return f"## Licence\n\nThe weights follow {model}; {data_line}."
