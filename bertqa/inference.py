"""Run a model on windows: the one logits loop (one process or many), evaluation, and using a trained model.

Training-time evaluation (`bertqa.engine`) and the scripts that use a saved model both come through here, so there is
a single loop from windows to logits to answers. `bertqa.json`, saved next to a model by training, holds the window
settings and the no-answer threshold it was trained with.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import json
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from bertqa.batching import eval_loader, model_inputs
from bertqa.data import Example, Features, Window, is_v2, tokenize_examples
from bertqa.postprocess import Prediction, postprocess, score

if TYPE_CHECKING:
    from accelerate import Accelerator

logger = logging.getLogger("bertqa")

__all__ = [
    "DEFAULT_SETTINGS",
    "Answer",
    "Answerer",
    "answer_questions",
    "cpu_has_native_bf16",
    "eval_batches",
    "evaluate",
    "evaluate_model",
    "keep_freed_memory",
    "load_settings",
    "make_accelerator",
    "predict_logits",
    "question_pairs",
    "resolve_precision",
]

# What a model folder without bertqa.json (e.g. a plain hub checkpoint) is used with.
DEFAULT_SETTINGS: dict[str, Any] = {
    **Window().to_dict(),
    "max_answer_length": 30,
    "v2": False,
    "no_answer_threshold": None,
    "eval_data": None,
    "column_map": None,
}


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (AMX or AVX512-BF16), where bf16 autocast is much faster."""
    probes = (getattr(torch.cpu, "_is_amx_tile_supported", None), getattr(torch.cpu, "_is_avx512_bf16_supported", None))
    return any(probe is not None and probe() for probe in probes)


def resolve_precision(mode: str, *, device: str | None = None) -> str:
    """ "auto" -> bf16 where the hardware runs it natively (a GPU that supports it, or a CPU with AMX or
    AVX512-BF16), otherwise full precision; fp16 only when asked for. `device` defaults to the GPU if there is one.
    On such CPUs bf16 trained 1.8x and evaluated 2.4x faster than fp32, to the same F1 (docs/BENCHMARKS.md)."""
    if mode != "auto":
        return mode
    if (device or ("cuda" if torch.cuda.is_available() else "cpu")) == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "no"
    return "bf16" if cpu_has_native_bf16() else "no"


# Set by a user who tunes the C allocator (or replaces it) themselves: then bertqa leaves it alone.
_ALLOCATOR_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "GLIBC_TUNABLES", "LD_PRELOAD")
KEEP_FREED_MEMORY_ENV = "BERTQA_KEEP_FREED_MEMORY"  # "0": leave glibc's defaults (e.g. to measure what this gains)


@functools.cache
def keep_freed_memory() -> bool:
    """Let glibc keep freed memory for reuse instead of handing it back to the OS; True if it took effect.

    On a CPU every training step allocates and frees activations of tens of MB. glibc serves blocks that large with
    mmap and returns them on free, so each step faults its pages in (and zeroes them) again: on a 2-core machine a
    fifth of a bf16 training step went to the kernel, and this setting made training 1.26x faster. It is what
    preloading jemalloc or tcmalloc does for PyTorch on CPUs, without a library to install. The process keeps its
    peak memory instead of shrinking after a peak. Skipped off glibc, where the environment already sets the
    allocator's thresholds or preloads a library, and with BERTQA_KEEP_FREED_MEMORY=0.
    """
    if not sys.platform.startswith("linux") or any(os.environ.get(name) for name in _ALLOCATOR_ENV):
        return False
    if os.environ.get(KEEP_FREED_MEMORY_ENV, "1") == "0":
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (musl, ...)
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's malloc.h
    # mallopt takes a C int: 1 GiB and 2 GiB - 1 are the largest round values that fit (a larger one would wrap).
    done = bool(mallopt(m_mmap_threshold, 2**30)) and bool(mallopt(m_trim_threshold, 2**31 - 1))
    logger.debug("glibc keeps freed memory for reuse: %s", done)
    return done


def make_accelerator(*, timeout_s: float = 1800, **kwargs: Any) -> Accelerator:
    """An Accelerator; several processes without a GPU (torchrun, `accelerate launch --multi_gpu` on a CPU machine)
    become CPU data parallelism over gloo instead of silently running as independent single processes.

    A collective that waits more than `timeout_s` seconds for another process (one that stalled or died) fails
    instead of hanging forever. Without a GPU, glibc is first told to keep freed memory (`keep_freed_memory`).
    Prepared loaders copy batches to the device without blocking, so with pinned batches (`train_loader`'s
    `pin_memory`) no update waits on the copy.
    """
    from datetime import timedelta

    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, is_initialized
    from accelerate.utils import DataLoaderConfiguration, InitProcessGroupKwargs

    multi_process = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if not torch.cuda.is_available():
        keep_freed_memory()
    timeout = InitProcessGroupKwargs(timeout=timedelta(seconds=timeout_s))
    if is_initialized() and kwargs.get("mixed_precision") not in (None, AcceleratorState().mixed_precision):
        # One process holds one Accelerate state: a second run in the same process keeps the first's precision.
        logger.warning(
            "this process already runs in %s precision; %s is used instead of %s",
            *(AcceleratorState().mixed_precision, AcceleratorState().mixed_precision, kwargs["mixed_precision"]),
        )
        kwargs["mixed_precision"] = AcceleratorState().mixed_precision
    kwargs.setdefault("dataloader_config", DataLoaderConfiguration(non_blocking=True))
    return Accelerator(cpu=multi_process and not torch.cuda.is_available(), kwargs_handlers=[timeout], **kwargs)


def eval_batches(
    features: Features,
    *,
    batch_size: int,
    pad_token_id: int,
    pad_to_multiple_of: int = 8,
    accelerator: Accelerator | None = None,
) -> torch.utils.data.DataLoader:
    """Length-sorted evaluation batches of `features`; with an `accelerator`, each process gets its share."""
    on_gpu = accelerator.device.type == "cuda" if accelerator is not None else torch.cuda.is_available()
    loader = eval_loader(
        features,
        batch_size=batch_size,
        pad_token_id=pad_token_id,
        pad_to_multiple_of=pad_to_multiple_of,
        pin_memory=on_gpu,
    )
    if accelerator is None:
        return loader
    # The module-level function, not accelerator.prepare: a prepared loader would be registered for checkpointing.
    from accelerate.data_loader import prepare_data_loader

    return prepare_data_loader(
        loader,
        accelerator.device,
        num_processes=accelerator.num_processes,
        process_index=accelerator.process_index,
        put_on_device=True,
        non_blocking=on_gpu,
    )


@torch.no_grad()
def predict_logits(
    model: torch.nn.Module,
    loader: torch.utils.data.DataLoader,
    *,
    accelerator: Accelerator | None = None,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Start/end logits of every window of an `eval_batches` loader, in the order of its features.

    Without an `accelerator` the loop runs in this process on the model's device. With one, each process runs its
    share and the rows are gathered with their feature indices and written to their index, so the duplicates that
    uneven sharding adds fall away; every process gets the whole result. `progress` shows a bar (main process).
    """
    from tqdm.auto import tqdm

    features: Features = loader.dataset.features
    device = accelerator.device if accelerator is not None else next(model.parameters()).device
    width = int(features.lengths.max())
    logits_out = np.full((2, len(features), width), -1e4, dtype=np.float32)
    was_training = model.training
    model.eval()
    main = accelerator is None or accelerator.is_main_process
    for batch in tqdm(loader, desc="eval", unit="batch", leave=False, disable=not (progress and main)):
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        out = model(**model_inputs(batch))
        # One width for every batch so they can be gathered across processes (a negative pad crops the
        # multiple-of-8 padding that can reach past the longest window).
        logits = torch.stack([out.start_logits, out.end_logits], dim=1).float()
        logits = torch.nn.functional.pad(logits, (0, width - logits.shape[-1]), value=-1e4)
        index = batch["feature_index"]
        if accelerator is not None:
            logits = accelerator.pad_across_processes(logits, dim=0)
            index = accelerator.pad_across_processes(index, dim=0, pad_index=-1)
            logits, index = accelerator.gather((logits, index))
        keep = (index >= 0).cpu().numpy()
        logits_out[:, index.cpu().numpy()[keep]] = logits.cpu().numpy()[keep].transpose(1, 0, 2)
    model.train(was_training)
    return logits_out[0], logits_out[1]


def evaluate(
    accelerator: Accelerator,
    model: torch.nn.Module,
    loader: torch.utils.data.DataLoader,
    examples: Sequence[Example],
    *,
    v2: bool,
    max_answer_length: int = 30,
    threshold: float = 0.0,
    progress: bool = False,
) -> tuple[dict[str, float], dict[str, Prediction]]:
    """Predict every window, post-process and score once on the main process, and share the metrics with all.

    Returns (metrics, predictions): metrics on every process, predictions on the main one (empty elsewhere).
    """
    import time

    from accelerate.utils import broadcast_object_list

    t0 = time.perf_counter()
    start, end = predict_logits(model, loader, accelerator=accelerator, progress=progress)
    t1 = time.perf_counter()
    metrics: dict[str, float] = {}
    predictions: dict[str, Prediction] = {}
    if accelerator.is_main_process:
        features = loader.dataset.features
        predictions = postprocess(examples, features, start, end, max_answer_length=max_answer_length)
        metrics = score(examples, predictions, v2=v2, threshold=threshold)
        metrics.update(eval_predict_s=t1 - t0, eval_postprocess_s=time.perf_counter() - t1)
    return broadcast_object_list([metrics])[0], predictions


def load_settings(model_dir: str | Path) -> dict[str, Any]:
    """The window settings and no-answer threshold saved next to a model by training, else the defaults."""
    path = Path(model_dir) / "bertqa.json"
    saved = json.loads(path.read_text()) if path.is_file() else {}
    return {**DEFAULT_SETTINGS, **{k: v for k, v in saved.items() if k in DEFAULT_SETTINGS}}


def _recorded_eval_data(model_dir: str | Path, settings: dict[str, Any]) -> str:
    if not (Path(model_dir) / "bertqa.json").is_file():
        logger.info("%s has no bertqa.json: evaluating on dev-v1.1 (pass --data for other data)", model_dir)
        return "dev-v1.1"
    if not settings.get("eval_data"):
        raise ValueError(
            f"{model_dir} records no evaluation data to use again (it was evaluated on held-out training data); "
            "pass --data"
        )
    logger.info("evaluating on %s, the evaluation data recorded with the model", settings["eval_data"])
    return str(settings["eval_data"])


def answer_questions(
    model: torch.nn.Module,
    tokenizer: Any,
    items: Sequence[tuple[str, str]],
    *,
    settings: dict[str, Any] | None = None,
    batch_size: int = 64,
) -> list[Prediction]:
    """Answer (question, context) pairs with a model already loaded: one `Prediction` per pair, in order."""
    settings = {**DEFAULT_SETTINGS, **(settings or {})}
    examples = [Example(str(i), "", context, question, (), (), True) for i, (question, context) in enumerate(items)]
    features = tokenize_examples(examples, tokenizer, Window.from_dict(settings))
    loader = eval_batches(features, batch_size=batch_size, pad_token_id=tokenizer.pad_token_id)
    start, end = predict_logits(model, loader)
    preds = postprocess(examples, features, start, end, max_answer_length=settings["max_answer_length"])
    return [preds[ex.id] for ex in examples]


@dataclass(frozen=True)
class Answer:
    """One answer. `context[start:end] == answer`; `probability` is the softmax over the question's candidate spans
    and "no answer"; for v2 models `no_answer_probability` too. No answer: "" with start/end None."""

    id: Any
    answer: str
    start: int | None
    end: int | None
    score: float | None
    probability: float | None
    no_answer_probability: float | None = None
    top_k: tuple[dict[str, Any], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        if self.no_answer_probability is None:
            del out["no_answer_probability"]
        if not self.top_k:
            del out["top_k"]
        return out


class Answerer:
    """A trained model loaded once to answer many questions: batched, on a GPU when there is one, in bf16 where the
    hardware runs it natively (NVIDIA GPUs with bf16, CPUs with AMX or AVX512-BF16), with the window settings and
    no-answer threshold saved beside the model (`bertqa.json`).

        answerer = Answerer("runs/quick/final_model")
        answerer([{"question": "Who wrote it?", "context": "The book was written by Ann Lee in 1990."}])
    """

    def __init__(
        self,
        model_dir: str | Path,
        *,
        device: str | None = None,
        precision: str = "auto",
        batch_size: int = 64,
        threshold: float | None = None,
    ) -> None:
        from bertqa.model import build_model, build_tokenizer

        self.settings = load_settings(model_dir)
        self.tokenizer = build_tokenizer(model_dir)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = build_model(model_dir).to(self.device).eval()
        if self.device.type == "cpu":
            keep_freed_memory()
        self.bf16 = resolve_precision(precision, device=self.device.type) == "bf16"
        self.batch_size = batch_size
        saved = self.settings["no_answer_threshold"]
        self.v2 = bool(self.settings["v2"])
        self.threshold = threshold if threshold is not None else (saved if self.v2 else None)

    def __call__(self, questions: Sequence[Mapping[str, Any]], *, top_k: int = 0) -> list[Answer]:
        """Answer `{"question", "context"[, "id"]}` records (ids are kept as given, else the position); with
        `top_k`, each answer also lists that many candidate spans, best first."""
        pairs = question_pairs(questions)
        if not pairs:
            return []
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            preds = answer_questions(
                self.model, self.tokenizer, pairs, settings=self.settings, batch_size=self.batch_size
            )
        return [self._answer(q.get("id", i), p, top_k) for i, (q, p) in enumerate(zip(questions, preds))]

    def _answer(self, qid: Any, pred: Prediction, top_k: int) -> Answer:
        span_probs, null_prob = pred.probabilities()
        candidates = tuple(
            {"answer": s.text, "start": s.start, "end": s.end, "score": s.score, "probability": p}
            for s, p in zip(pred.spans()[:top_k], span_probs)
        )
        no_answer = self.v2 and pred.answer(self.threshold) == ""
        if no_answer or not pred.nbest:
            score = pred.null_score if no_answer else None
            probability = null_prob if no_answer else None
            return Answer(qid, "", None, None, score, probability, null_prob if self.v2 else None, candidates)
        best = pred.spans()[0]
        v2_null = null_prob if self.v2 else None
        return Answer(qid, best.text, best.start, best.end, best.score, span_probs[0], v2_null, candidates)


def question_pairs(
    questions: Sequence[Mapping[str, Any]], places: Sequence[str] | None = None
) -> list[tuple[str, str]]:
    """(question, context) of each record; a record that is not one, or lacks either as non-empty text, is named
    by `places[i]` (say "q.jsonl: line 3"), else by its position and id."""
    if isinstance(questions, (Mapping, str)):
        raise TypeError("pass a list of {'question': ..., 'context': ...} records (one record goes in a list too)")
    pairs = []
    for i, record in enumerate(questions):
        if not isinstance(record, Mapping):
            raise TypeError(
                f"question {i}: expected a record with 'question' and 'context', got {type(record).__name__}"
            )
        for key in ("question", "context"):
            if not isinstance(record.get(key), str) or not record[key].strip():
                problem = "is missing" if key not in record else "must be non-empty text"
                place = places[i] if places is not None else f"question {i} (id {record.get('id', i)!r})"
                raise ValueError(f"{place}: {key!r} {problem}")
        pairs.append((record["question"], record["context"]))
    return pairs


def evaluate_model(
    model_dir: str,
    eval_data: str | None = None,
    *,
    answerable_only: bool = False,
    max_examples: int | None = None,
    seed: int = 42,
    batch_size: int = 64,
    threshold: float | None = None,
    mixed_precision: str = "auto",
    column_map: str | None = None,
) -> tuple[dict[str, float], dict[str, Prediction], list[Example]]:
    """Score a saved model on a dataset with the settings it was trained with; works under `accelerate launch`.

    `eval_data` defaults to the evaluation data recorded with the model (dev-v1.1 for a model without
    `bertqa.json`). For v2 data the no-answer threshold is `threshold`, else the one saved with the model, else 0.
    A model trained for the other SQuAD version than the data's is scored all the same, with a loud warning.
    Returns (metrics, predictions, examples); metrics on every process, predictions on the main one.
    """
    from bertqa.data import load_examples
    from bertqa.model import build_model, build_tokenizer

    settings = load_settings(model_dir)
    eval_data = eval_data or _recorded_eval_data(model_dir, settings)
    tokenizer = build_tokenizer(model_dir)
    accelerator = make_accelerator(mixed_precision=resolve_precision(mixed_precision))
    if column_map is None and eval_data == settings.get("eval_data"):  # the recorded data, read as in training
        column_map = settings.get("column_map")
    examples, report = load_examples(
        eval_data, answerable=answerable_only, max_examples=max_examples, seed=seed, column_map=column_map
    )
    logger.info("loaded %s", report.format())
    features = tokenize_examples(examples, tokenizer, Window.from_dict(settings))
    model = accelerator.prepare(build_model(model_dir))
    v2 = is_v2(examples)
    if (Path(model_dir) / "bertqa.json").is_file() and v2 != bool(settings["v2"]):
        logger.warning(
            "VERSION MISMATCH: %s was trained on SQuAD %s data but %s is SQuAD %s: %s",
            *(model_dir, "v2.0" if settings["v2"] else "v1.1", eval_data, "v2.0" if v2 else "v1.1"),
            "its unanswerable questions count against a model that never learned to say 'no answer'"
            if v2 else "it is scored as v1.1 (every question has an answer) and the no-answer threshold is not used",
        )  # fmt: skip
    logger.info(
        "evaluating %d examples (%d windows, %s) on %d processes",
        *(len(examples), len(features), "v2.0" if v2 else "v1.1", accelerator.num_processes),
    )
    if threshold is None:
        threshold = settings["no_answer_threshold"] or 0.0
    loader = eval_batches(features, batch_size=batch_size, pad_token_id=tokenizer.pad_token_id, accelerator=accelerator)
    metrics, predictions = evaluate(
        accelerator, model, loader, examples, v2=v2, max_answer_length=settings["max_answer_length"],
        threshold=threshold, progress=True,
    )  # fmt: skip
    metrics["no_answer_threshold"] = threshold if v2 else None
    return metrics, predictions, examples
