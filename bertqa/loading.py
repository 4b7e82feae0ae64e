"""Reading QA data: bundled SQuAD names, official-layout JSON files and hub datasets, validated into `Example`s.

Every problem names its place (file, article/paragraph/question index, id, key), and an `answer_start` that does
not point at its answer text is repaired or refused by an explicit policy. Nothing here tokenizes: that is `data`.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

__all__ = [
    "BUNDLED",
    "Example",
    "LoadReport",
    "SquadFormatError",
    "is_v2",
    "load_squad",
    "parse_squad",
    "resolve_source",
]

DATA_DIR = Path(__file__).resolve().parent.parent / "data" / "squad"
# Short names for the SQuAD files shipped in data/squad/ (see its MANIFEST.md).
BUNDLED = {
    "train-v1.1": DATA_DIR / "train-v1.1.json.gz",
    "dev-v1.1": DATA_DIR / "dev-v1.1.json.gz",
    "dev-v2.0": DATA_DIR / "dev-v2.0.json.gz",
}
# Hub dataset names that `datasets.load_dataset` understands, and whether they hold unanswerable questions.
HUB_DATASETS = {"squad": False, "rajpurkar/squad": False, "squad_v2": True, "rajpurkar/squad_v2": True}

MismatchPolicy = Literal["repair", "error"]


class SquadFormatError(ValueError):
    """A SQuAD file that does not follow the official layout, or whose answers do not point at their text."""


@dataclass(frozen=True, slots=True)
class Example:
    """One SQuAD question. `answer_starts[i]` is the character offset of `answer_texts[i]` in `context`."""

    id: str
    title: str
    context: str
    question: str
    answer_texts: tuple[str, ...]
    answer_starts: tuple[int, ...]
    is_impossible: bool = False


@dataclass(frozen=True)
class LoadReport:
    """What loading found: counts, the SQuAD version, and how many answer offsets had to be repaired."""

    source: str
    version: str
    n_examples: int
    n_impossible: int
    n_answers: int
    n_repaired: int


def is_v2(examples: Iterable[Example]) -> bool:
    """SQuAD v2 data: some questions are unanswerable (scored with HasAns/NoAns and a no-answer threshold)."""
    return any(ex.is_impossible for ex in examples)


def resolve_source(source: str | Path) -> str | Path:
    """Map a bundled short name to its file; leave paths and hub names alone."""
    if isinstance(source, str) and source in BUNDLED:
        path = BUNDLED[source]
        if not path.exists():
            raise FileNotFoundError(
                f"bundled SQuAD file {source!r} is missing at {path}; it ships in the source tree under data/squad/, "
                "so install bertqa from a checkout (pip install -e .) or pass a path to a SQuAD JSON file"
            )
        return path
    return source


def load_squad(source: str | Path, *, on_mismatch: MismatchPolicy = "repair") -> tuple[list[Example], LoadReport]:
    """Load SQuAD v1.1/v2.0 examples from a bundled name, an official-layout `.json`/`.json.gz` file or a hub name.

    Hub names (`squad`, `squad_v2`) go through `datasets` and need internet (or its cache). Local files are validated:
    see `parse_squad` for the policy on answer offsets that do not point at their text.
    """
    resolved = resolve_source(source)
    path = Path(resolved)
    if path.suffix in {".json", ".gz"} or path.exists():
        if not path.exists():
            raise FileNotFoundError(f"SQuAD file not found: {path}")
        opener = gzip.open if path.suffix == ".gz" else open
        try:
            with opener(path, "rt", encoding="utf-8") as f:
                raw = json.load(f)
        except (json.JSONDecodeError, OSError, UnicodeDecodeError) as err:
            raise SquadFormatError(f"{path}: not readable as SQuAD JSON ({err})") from err
        return parse_squad(raw, source=str(path), on_mismatch=on_mismatch)
    return _load_hub(str(resolved), on_mismatch=on_mismatch)


def _load_hub(name: str, *, on_mismatch: MismatchPolicy) -> tuple[list[Example], LoadReport]:
    """Load `name` (optionally `name:split`, default split `train`) from the Hugging Face hub."""
    dataset_name, _, split = name.partition(":")
    if dataset_name not in HUB_DATASETS:
        raise FileNotFoundError(
            f"{name!r} is neither a file, a bundled name ({', '.join(BUNDLED)}) nor a known hub dataset "
            f"({', '.join(HUB_DATASETS)}; add ':validation' for the dev split)"
        )
    import datasets  # imported here: it is slow to import and only hub loading needs it

    rows = datasets.load_dataset(dataset_name, split=split or "train")
    examples = [
        _make_example(
            row["id"],
            row["title"],
            row["context"],
            row["question"],
            [{"text": t, "answer_start": s} for t, s in zip(row["answers"]["text"], row["answers"]["answer_start"])],
            is_impossible=not row["answers"]["text"],
            where=f"{name} id {row['id']}",
        )
        for row in rows
    ]
    version = "v2.0" if HUB_DATASETS[dataset_name] else "1.1"
    return _checked(examples, source=name, version=version, on_mismatch=on_mismatch)


def parse_squad(
    raw: Any, *, source: str = "<json>", on_mismatch: MismatchPolicy = "repair"
) -> tuple[list[Example], LoadReport]:
    """Turn parsed official-layout SQuAD JSON into flat examples, checking every key on the way.

    Policy for an `answer_start` that does not point at its answer text: with `"repair"` (the default) the start moves
    to the nearest occurrence of the text in the context and is counted in `LoadReport.n_repaired`; with `"error"`
    it raises. An answer whose text does not occur in its context at all always raises: no offset can be right.
    """
    if not isinstance(raw, dict) or not isinstance(raw.get("data"), list):
        raise SquadFormatError(f"{source}: expected a JSON object with a 'data' list (the official SQuAD layout)")
    version = str(raw.get("version", "unknown"))
    examples: list[Example] = []
    for a, article in enumerate(raw["data"]):
        title = _get(article, "title", str, f"{source}: data[{a}]")
        for p, paragraph in enumerate(_get(article, "paragraphs", list, f"{source}: data[{a}]")):
            where_p = f"{source}: data[{a}].paragraphs[{p}]"
            context = _get(paragraph, "context", str, where_p)
            for q, qa in enumerate(_get(paragraph, "qas", list, where_p)):
                where = f"{where_p}.qas[{q}]"
                impossible = bool(qa.get("is_impossible", False)) if isinstance(qa, dict) else False
                examples.append(
                    _make_example(
                        _get(qa, "id", str, where),
                        title,
                        context,
                        _get(qa, "question", str, where),
                        _get(qa, "answers", list, where),
                        is_impossible=impossible,
                        where=where,
                    )
                )
    if any(ex.is_impossible for ex in examples) and not version.startswith("v2"):
        version = "v2.0"
    return _checked(examples, source=source, version=version, on_mismatch=on_mismatch)


def _get(obj: Any, key: str, kind: type, where: str) -> Any:
    if not isinstance(obj, dict):
        raise SquadFormatError(f"{where}: expected an object, got {type(obj).__name__}")
    if key not in obj:
        raise SquadFormatError(f"{where}: missing key {key!r}")
    if not isinstance(obj[key], kind):
        raise SquadFormatError(f"{where}.{key}: expected {kind.__name__}, got {type(obj[key]).__name__}")
    return obj[key]


def _make_example(
    qid: str, title: str, context: str, question: str, answers: list, *, is_impossible: bool, where: str
) -> Example:
    texts: list[str] = []
    starts: list[int] = []
    for i, answer in enumerate(answers):
        texts.append(_get(answer, "text", str, f"{where}.answers[{i}]"))
        starts.append(_get(answer, "answer_start", int, f"{where}.answers[{i}]"))
    if not texts and not is_impossible:
        raise SquadFormatError(f"{where}: question {qid!r} has no answers but is not marked is_impossible")
    return Example(qid, title, context, question, tuple(texts), tuple(starts), is_impossible)


def _checked(
    examples: list[Example], *, source: str, version: str, on_mismatch: MismatchPolicy
) -> tuple[list[Example], LoadReport]:
    """Check that every answer_start points at its text; repair or raise as the policy says."""
    seen: set[str] = set()
    out: list[Example] = []
    n_repaired = 0
    for ex in examples:
        if ex.id in seen:
            raise SquadFormatError(f"{source}: question id {ex.id!r} appears twice")
        seen.add(ex.id)
        starts = list(ex.answer_starts)
        for i, (text, start) in enumerate(zip(ex.answer_texts, ex.answer_starts)):
            if ex.context[start : start + len(text)] == text:
                continue
            found = _nearest_occurrence(ex.context, text, start)
            problem = (
                f"{source}: question {ex.id!r} answer {i}: answer_start {start} points at "
                f"{ex.context[start : start + len(text)]!r}, not at the answer text {text!r}"
            )
            if found is None:
                raise SquadFormatError(problem + "; the text does not occur in the context at all")
            if on_mismatch == "error":
                raise SquadFormatError(problem + f" (it occurs at {found}; on_mismatch='repair' would move it there)")
            starts[i] = found
            n_repaired += 1
        out.append(ex if starts == list(ex.answer_starts) else _replace_starts(ex, tuple(starts)))
    report = LoadReport(
        source=source,
        version=version,
        n_examples=len(out),
        n_impossible=sum(ex.is_impossible for ex in out),
        n_answers=sum(len(ex.answer_texts) for ex in out),
        n_repaired=n_repaired,
    )
    return out, report


def _replace_starts(ex: Example, starts: tuple[int, ...]) -> Example:
    return Example(ex.id, ex.title, ex.context, ex.question, ex.answer_texts, starts, ex.is_impossible)


def _nearest_occurrence(context: str, text: str, start: int) -> int | None:
    positions = []
    pos = context.find(text)
    while pos != -1 and text:
        positions.append(pos)
        pos = context.find(text, pos + 1)
    return min(positions, key=lambda p: abs(p - start)) if positions else None
