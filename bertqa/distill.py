"""Distillation: a student trained on the gold spans and on a trained teacher's start/end distributions.

`Distillation` is a `compute_loss` for `fit` (what `--teacher` builds) or for `train_one_epoch` in a loop of your own:
(1 - alpha) x `engine.qa_loss` + alpha x T^2 x KL(teacher || student) at temperature T, over each window's real
tokens only (padding is masked as in `qa_loss`). The T^2 keeps the soft term's gradients on the scale of the gold
term's whatever the temperature (Hinton et al., 2015). The teacher runs without gradients, in eval mode, on the
student's device and under the student's autocast; it is never wrapped for several processes (it is not trained).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bertqa.batching import model_inputs
from bertqa.training.loss import qa_loss

__all__ = [
    "Distillation",
    "check_same_vocabulary",
    "check_teacher",
    "load_teacher",
    "soft_span_loss",
    "teacher_fingerprint",
]

Batch = dict[str, torch.Tensor]


def check_same_vocabulary(teacher_tokenizer: Any, student_tokenizer: Any, *, teacher: str) -> None:
    """Refuse a teacher whose tokenizer maps text to other ids: its distributions would be over other tokens."""
    theirs, ours = teacher_tokenizer.get_vocab(), student_tokenizer.get_vocab()
    if theirs == ours:
        return
    differing = sorted(set(theirs.items()) ^ set(ours.items()), key=lambda item: item[1])
    example = f"; e.g. {differing[0][0]!r}" if differing else ""
    raise ValueError(
        f"teacher {teacher}: its tokenizer's vocabulary ({len(theirs):,} tokens) differs from the student's "
        f"({len(ours):,} tokens){example}. A teacher must share the student's tokenizer"
    )


def check_teacher(path: str | Path, *, student_tokenizer: Any, window: Any = None) -> None:
    """Refuse, before any work and naming the teacher, a teacher that cannot teach this student: one that does not
    load, is not a question-answering model (its QA head would be random), has another vocabulary, or cannot read
    the student's windows (`window`: a shorter position table)."""
    from transformers import AutoConfig

    from bertqa.model import build_tokenizer, check_model_limits, load_pretrained, refuse_adapter

    name = str(path)
    folder = Path(name).expanduser()
    refuse_adapter(name, kind="teacher")
    if folder.is_dir() and not (folder / "config.json").is_file():
        inside = [sub for sub in ("final_model", "best_model") if (folder / sub / "config.json").is_file()]
        hint = f"; did you mean {folder / inside[0]}?" if inside else ""
        raise ValueError(f"teacher {name}: no model there (no config.json){hint}")
    try:
        config = load_pretrained("teacher config", AutoConfig.from_pretrained, name)
        teacher_tokenizer = build_tokenizer(name)
    except (OSError, ValueError) as err:
        raise ValueError(f"teacher {name}: {err}") from err
    heads = [arch for arch in config.architectures or [] if arch.endswith("ForQuestionAnswering")]
    if not heads:
        raise ValueError(
            f"teacher {name} is not a question-answering model (its config names {config.architectures or 'none'}): "
            "its QA head would be random. Give a QA model, e.g. the final_model of a bertqa run"
        )
    check_same_vocabulary(teacher_tokenizer, student_tokenizer, teacher=name)
    if window is not None:
        try:
            check_model_limits(name, student_tokenizer, window)
        except ValueError as err:
            raise ValueError(f"teacher {name}: {err}") from err


def load_teacher(
    path: str | Path, *, student_tokenizer: Any, device: torch.device | str = "cpu", window: Any = None
) -> torch.nn.Module:
    """A trained QA model to distil from (checked by `check_teacher`): weights in float32 on `device`, in eval mode,
    without gradients."""
    from bertqa.model import build_model

    name = str(path)
    check_teacher(name, student_tokenizer=student_tokenizer, window=window)
    teacher = build_model(name).to(device).eval()
    teacher.requires_grad_(False)
    return teacher


def teacher_fingerprint(path: str | Path) -> str | None:
    """A digest of a teacher folder's config and weights, so that a resumed run notices a teacher retrained in the
    same place (None for a hub id: its name is all there is to compare)."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        return None
    digest = hashlib.sha256()
    for file in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")) + [folder / "config.json"]:
        if file.is_file():
            digest.update(file.name.encode())
            with file.open("rb") as f:
                for chunk in iter(lambda: f.read(1 << 22), b""):
                    digest.update(chunk)
    return digest.hexdigest()[:16]


def soft_span_loss(
    student: tuple[torch.Tensor, torch.Tensor],
    teacher: tuple[torch.Tensor, torch.Tensor],
    attention_mask: torch.Tensor,
    *,
    temperature: float,
) -> torch.Tensor:
    """T^2 x KL(teacher || student) of the start and of the end distributions at temperature T, averaged over the
    two and over the windows; padding positions have no probability in either distribution."""
    padding = attention_mask == 0
    total = torch.zeros((), device=attention_mask.device)
    for ours, theirs in zip(student, teacher):
        log_q = (ours.float() / temperature).masked_fill(padding, -1e9).log_softmax(-1)
        log_p = (theirs.float() / temperature).masked_fill(padding, -1e9).log_softmax(-1)
        kl = (log_p.exp() * (log_p - log_q)).masked_fill(padding, 0).sum(-1)
        total = total + kl.mean() / 2
    return total * temperature**2


@dataclass
class Distillation:
    """`compute_loss(model, batch)`: (1 - alpha) x the gold-span loss + alpha x `soft_span_loss` to `teacher`.

    `autocast` is the student's mixed-precision context (`accelerator.autocast`), so the teacher computes in the
    same precision; the default computes as the weights are.
    """

    teacher: torch.nn.Module
    alpha: float = 0.5
    temperature: float = 2.0
    autocast: Callable[[], AbstractContextManager[Any]] = field(default=nullcontext)

    def __post_init__(self) -> None:
        if not 0 <= self.alpha <= 1:
            raise ValueError(f"distill_alpha must be in [0, 1], got {self.alpha}")
        if not self.temperature > 0:
            raise ValueError(f"distill_temperature must be positive, got {self.temperature}")

    def __call__(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        inputs = model_inputs(batch)  # never the labels: the model would add its own, unmasked, loss
        out = model(**inputs)
        gold = qa_loss(out.start_logits, out.end_logits, batch)
        if self.alpha == 0:
            return gold
        with torch.no_grad(), self.autocast():
            theirs = self.teacher(**inputs)
        soft = soft_span_loss(
            (out.start_logits, out.end_logits),
            (theirs.start_logits, theirs.end_logits),
            batch["attention_mask"],
            temperature=self.temperature,
        )
        return (1 - self.alpha) * gold + self.alpha * soft
