"""SQuAD data: load and validate examples, filter and subsample them, cut them into labelled token windows.

Everything here is a pure function on plain data (lists, numpy arrays, a tokenizer), so each step can be tested on
its own. Vocabulary: an *example* is one SQuAD question with its context; a *feature* is one tokenized window of it.
"""

from __future__ import annotations

import gzip
import itertools
import json
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from bertqa.metrics import normalize_answer

__all__ = [
    "BUNDLED",
    "Example",
    "Features",
    "LabelReport",
    "LoadReport",
    "SquadFormatError",
    "answerable_only",
    "check_labels",
    "label_features",
    "load_examples",
    "load_squad",
    "parse_squad",
    "resolve_source",
    "select_articles",
    "split_article_range",
    "subsample",
    "tokenize_examples",
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


# ----------------------------------------------------------------------------------------------------------- loading


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


# ------------------------------------------------------------------------------------------ filtering, subsampling


def load_examples(
    source: str | Path, *, answerable: bool = False, max_examples: int | None = None, seed: int = 0
) -> tuple[list[Example], LoadReport]:
    """`load_squad`, then a range of articles, then optionally answerable questions only, then a seeded subset.

    `source` may end in an article range, `dev-v2.0[:25]` or `dev-v2.0[25:]` (see `split_article_range`): this is how
    one file is split into training and evaluation parts that share no article.
    """
    source, articles = split_article_range(source)
    examples, report = load_squad(source)
    if articles is not None:
        examples = select_articles(examples, articles)
    if answerable:
        examples = answerable_only(examples)
    return subsample(examples, max_examples, seed=seed), report


_ARTICLE_RANGE = re.compile(r"^(?P<source>.+)\[(?P<start>\d*):(?P<stop>\d*)\]$")


def split_article_range(source: str | Path) -> tuple[str | Path, slice | None]:
    """`"dev-v2.0[:25]"` -> `("dev-v2.0", slice(None, 25))`; a source without a trailing `[a:b]` is returned as is."""
    match = _ARTICLE_RANGE.match(str(source)) if isinstance(source, str) else None
    if match is None:
        return source, None
    start, stop = (int(match[k]) if match[k] else None for k in ("start", "stop"))
    return match["source"], slice(start, stop)


def select_articles(examples: Sequence[Example], articles: slice) -> list[Example]:
    """The examples of the articles in `articles`, a slice over the articles in file order (titles, first seen)."""
    titles = list(dict.fromkeys(ex.title for ex in examples))
    chosen = set(titles[articles])
    if not chosen:
        raise ValueError(
            f"article range [{articles.start or ''}:{articles.stop or ''}] selects no article of the {len(titles)}"
        )
    return [ex for ex in examples if ex.title in chosen]


def answerable_only(examples: Iterable[Example]) -> list[Example]:
    """Keep the questions that have an answer (the original recipe trained and scored on these only)."""
    return [ex for ex in examples if not ex.is_impossible]


def subsample(examples: Sequence[Example], n: int | None, *, seed: int) -> list[Example]:
    """A seeded random choice of `n` *examples* (not features), kept in their original order.

    Sampling examples rather than windows means an evaluation subset holds every window of each chosen question.
    """
    if n is None or n >= len(examples):
        return list(examples)
    if n <= 0:
        raise ValueError(f"subsample size must be positive, got {n}")
    chosen = sorted(random.Random(seed).sample(range(len(examples)), n))
    return [examples[i] for i in chosen]


# ------------------------------------------------------------------------------------------------------ tokenizing


@dataclass
class Features:
    """Tokenized windows, unpadded (batches are padded when they are formed, to their own longest window).

    `offsets[i]` is an int32 array of shape (len(input_ids[i]), 2) with each token's character span in the context,
    and -1 for tokens outside the context (question, special tokens), so post-processing never picks them.
    `start_positions`/`end_positions` are set by `label_features` (the CLS index when the window holds no answer).
    """

    input_ids: list[list[int]]
    token_type_ids: list[list[int]] | None
    offsets: list[np.ndarray]
    example_index: np.ndarray
    cls_index: np.ndarray
    start_positions: np.ndarray | None = None
    end_positions: np.ndarray | None = None
    lengths: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.lengths = np.fromiter((len(ids) for ids in self.input_ids), dtype=np.int64, count=len(self.input_ids))

    def __len__(self) -> int:
        return len(self.input_ids)


def check_window_settings(max_seq_length: int, doc_stride: int, max_query_length: int, n_special: int = 3) -> int:
    """Validate the window settings and return the number of context tokens one window has room for (at least)."""
    room = max_seq_length - max_query_length - n_special
    if room <= 0:
        raise ValueError(
            f"max_seq_length={max_seq_length} leaves no room for the context after a question of up to "
            f"max_query_length={max_query_length} tokens and {n_special} special tokens"
        )
    if not 0 <= doc_stride < room:
        raise ValueError(
            f"doc_stride={doc_stride} must be >= 0 and smaller than the context room of a window "
            f"({room} = max_seq_length {max_seq_length} - max_query_length {max_query_length} - {n_special} special "
            "tokens): it is the number of tokens consecutive windows share, so it must leave room for new text"
        )
    return room


def tokenize_examples(
    examples: Sequence[Example],
    tokenizer: Any,
    *,
    max_seq_length: int = 384,
    doc_stride: int = 128,
    max_query_length: int = 64,
    batch_size: int = 1000,
    num_proc: int = 1,
) -> Features:
    """Cut question+context into overlapping windows (`doc_stride` tokens shared between neighbours).

    Questions lose leading whitespace and are cut to `max_query_length` tokens, so that every window keeps the
    same minimum room for the context; only the context is ever split (`only_second`). With `num_proc` > 1 the
    examples are cut into that many contiguous shards, tokenized in worker processes and joined in order: the
    result is the same as with one process.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError("tokenize_examples needs a fast tokenizer: character offsets come only from fast tokenizers")
    n_special = tokenizer.num_special_tokens_to_add(pair=True)
    check_window_settings(max_seq_length, doc_stride, max_query_length, n_special)
    window = {"max_seq_length": max_seq_length, "doc_stride": doc_stride, "max_query_length": max_query_length}
    if num_proc > 1 and len(examples) > 1:
        return _tokenize_in_processes(examples, tokenizer, num_proc=num_proc, batch_size=batch_size, **window)
    return _tokenize(examples, tokenizer, batch_size=batch_size, **window)


def _tokenize(
    examples: Sequence[Example],
    tokenizer: Any,
    *,
    max_seq_length: int,
    doc_stride: int,
    max_query_length: int,
    batch_size: int,
) -> Features:
    with_type_ids = "token_type_ids" in tokenizer.model_input_names
    input_ids: list[list[int]] = []
    type_ids: list[list[int]] = []
    offsets: list[np.ndarray] = []
    example_index: list[int] = []
    cls_index: list[int] = []
    for begin in range(0, len(examples), batch_size):
        chunk = examples[begin : begin + batch_size]
        questions = _cut_questions([ex.question.lstrip() for ex in chunk], tokenizer, max_query_length)
        enc = tokenizer(
            questions,
            [ex.context for ex in chunk],
            truncation="only_second",
            max_length=max_seq_length,
            stride=doc_stride,
            return_overflowing_tokens=True,
            return_offsets_mapping=True,
            padding=False,
        )
        for i, ids in enumerate(enc["input_ids"]):
            # sequence_ids marks the context tokens (1); everything else gets offset -1.
            in_context = np.array([s == 1 for s in enc.sequence_ids(i)], dtype=bool)
            offs = np.asarray(enc["offset_mapping"][i], dtype=np.int32).reshape(-1, 2)
            offs[~in_context] = -1
            input_ids.append(ids)
            if with_type_ids:
                type_ids.append(enc["token_type_ids"][i])
            offsets.append(offs)
            example_index.append(begin + enc["overflow_to_sample_mapping"][i])
            cls_index.append(ids.index(tokenizer.cls_token_id) if tokenizer.cls_token_id in ids else 0)
    return Features(
        input_ids=input_ids,
        token_type_ids=type_ids if with_type_ids else None,
        offsets=offsets,
        example_index=np.asarray(example_index, dtype=np.int64),
        cls_index=np.asarray(cls_index, dtype=np.int64),
    )


def _tokenize_in_processes(examples: Sequence[Example], tokenizer: Any, *, num_proc: int, **settings: int) -> Features:
    """`_tokenize` on `num_proc` contiguous shards in worker processes, joined back in example order.

    Forked workers, as `datasets.map(num_proc=...)` uses on Linux: spawned ones would need every calling script to
    guard its entry point with `if __name__ == "__main__"`. The workers touch only the tokenizer and numpy, never
    torch or a GPU. The Rust tokenizer's own threads speed up the batch encoding only; the per-window Python work is
    what the processes spread over the cores.
    """
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    bounds = np.linspace(0, len(examples), min(num_proc, len(examples)) + 1).astype(int)
    shards = [list(examples[a:b]) for a, b in itertools.pairwise(bounds.tolist())]
    with ProcessPoolExecutor(len(shards), mp_context=multiprocessing.get_context("fork")) as pool:
        parts = list(pool.map(_tokenize_shard, shards, [tokenizer] * len(shards), [settings] * len(shards)))
    with_type_ids = parts[0].token_type_ids is not None
    return Features(
        input_ids=[ids for part in parts for ids in part.input_ids],
        token_type_ids=[t for part in parts for t in part.token_type_ids] if with_type_ids else None,
        offsets=[o for part in parts for o in part.offsets],
        example_index=np.concatenate([part.example_index + first for part, first in zip(parts, bounds)]),
        cls_index=np.concatenate([part.cls_index for part in parts]),
    )


def _tokenize_shard(examples: list[Example], tokenizer: Any, settings: dict[str, int]) -> Features:
    # One worker per core already: the tokenizer's thread pool would only compete with the other workers.
    import os

    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    return _tokenize(examples, tokenizer, **settings)


def _cut_questions(questions: list[str], tokenizer: Any, max_query_length: int) -> list[str]:
    """Cut each question after its `max_query_length`-th token (by character offset, so the text stays intact)."""
    enc = tokenizer(questions, add_special_tokens=False, return_offsets_mapping=True)
    out = []
    for question, offs in zip(questions, enc["offset_mapping"]):
        out.append(question[: offs[max_query_length - 1][1]] if len(offs) > max_query_length else question)
    return out


# -------------------------------------------------------------------------------------------------------- labelling


def label_features(features: Features, examples: Sequence[Example]) -> Features:
    """Set token start/end labels from each example's first answer, through the window's offset mapping.

    A window that does not hold the whole answer, and every window of an unanswerable question, is labelled with
    its CLS index (the "no answer in this window" target).
    """
    n = len(features)
    starts = features.cls_index.copy()
    ends = features.cls_index.copy()
    for i in range(n):
        ex = examples[features.example_index[i]]
        if ex.is_impossible or not ex.answer_texts:
            continue
        span = _char_span(ex.context, ex.answer_starts[0], ex.answer_texts[0])
        token_span = _token_span(features.offsets[i], *span)
        if token_span is not None:
            starts[i], ends[i] = token_span
    features.start_positions = starts
    features.end_positions = ends
    return features


def _char_span(context: str, start: int, text: str) -> tuple[int, int]:
    """The answer's [start, end) characters without surrounding whitespace (offsets never cover whitespace)."""
    end = start + len(text)
    while start < end and context[start].isspace():
        start += 1
    while end > start and context[end - 1].isspace():
        end -= 1
    return start, end


def _token_span(offsets: np.ndarray, start_char: int, end_char: int) -> tuple[int, int] | None:
    """First and last token covering [start_char, end_char), or None if the window does not hold all of it."""
    ctx = np.flatnonzero(offsets[:, 0] >= 0)
    if len(ctx) == 0:
        return None
    first, last = ctx[0], ctx[-1]
    if offsets[first, 0] > start_char or offsets[last, 1] < end_char:
        return None
    # Context offsets rise monotonically, so the boundary tokens are binary searches.
    tok_start = first + np.searchsorted(offsets[first : last + 1, 0], start_char, side="right") - 1
    tok_end = first + np.searchsorted(offsets[first : last + 1, 1], end_char, side="left")
    return int(tok_start), int(tok_end)


# ---------------------------------------------------------------------------------------------------- label checking


@dataclass(frozen=True)
class LabelReport:
    """How well the labels decode back to their gold answers, and how the examples were windowed."""

    n_examples: int
    n_features: int
    windows_per_example: float
    max_windows: int
    cls_share: float
    n_labelled: int
    n_match: int
    n_unreachable: int
    mismatches: tuple[tuple[str, str], ...]

    @property
    def match_rate(self) -> float:
        return self.n_match / self.n_labelled if self.n_labelled else 1.0

    def format(self) -> str:
        lines = [
            f"examples {self.n_examples:,}  windows {self.n_features:,}  "
            f"windows/example {self.windows_per_example:.2f} (max {self.max_windows})",
            f"windows labelled CLS (answer not inside, or no answer) {100 * self.cls_share:.1f}%",
            f"in-window labels that decode to the gold answer {self.n_match:,}/{self.n_labelled:,} "
            f"= {100 * self.match_rate:.2f}%",
            f"answerable examples with no window holding the whole answer {self.n_unreachable:,}",
        ]
        lines += [f"  mismatch: decoded {got!r} vs gold {gold!r}" for got, gold in self.mismatches[:5]]
        return "\n".join(lines)


def check_labels(
    features: Features, examples: Sequence[Example], *, min_match_rate: float = 0.99, max_shown: int = 5
) -> LabelReport:
    """Decode every in-window label span back to text and compare it with the gold answer (SQuAD normalisation).

    Raises ValueError when fewer than `min_match_rate` of the labels match: that is what labels built from the
    wrong offsets (characters as tokens, say) look like, and training on them can only learn noise.
    """
    if features.start_positions is None or features.end_positions is None:
        raise ValueError("check_labels needs labelled features: call label_features first")
    n_labelled = n_match = 0
    mismatches: list[tuple[str, str]] = []
    reachable = np.zeros(len(examples), dtype=bool)
    for i in range(len(features)):
        s, e = int(features.start_positions[i]), int(features.end_positions[i])
        if s == features.cls_index[i] and e == features.cls_index[i]:
            continue
        ex = examples[features.example_index[i]]
        reachable[features.example_index[i]] = True
        n_labelled += 1
        offs = features.offsets[i]
        # A label outside the window or the context decodes to nothing, so it counts as a mismatch.
        inside = 0 <= s <= e < len(offs) and offs[s, 0] >= 0 and offs[e, 1] >= 0
        decoded = ex.context[offs[s, 0] : offs[e, 1]] if inside else ""
        if normalize_answer(decoded) == normalize_answer(ex.answer_texts[0]):
            n_match += 1
        elif len(mismatches) < max_shown:
            mismatches.append((decoded, ex.answer_texts[0]))
    answerable = np.array([not ex.is_impossible for ex in examples], dtype=bool)
    used = np.zeros(len(examples), dtype=bool)
    used[features.example_index] = True
    counts = np.bincount(features.example_index, minlength=len(examples))
    report = LabelReport(
        n_examples=int(used.sum()),
        n_features=len(features),
        windows_per_example=float(len(features) / max(1, used.sum())),
        max_windows=int(counts.max()) if len(counts) else 0,
        cls_share=float(1 - n_labelled / max(1, len(features))),
        n_labelled=n_labelled,
        n_match=n_match,
        n_unreachable=int((answerable & used & ~reachable).sum()),
        mismatches=tuple(mismatches),
    )
    if report.match_rate < min_match_rate:
        raise ValueError(
            f"label self-check failed: only {100 * report.match_rate:.2f}% of in-window labels decode to their gold "
            f"answer (need {100 * min_match_rate:.1f}%); the start/end labels do not point at the answers.\n"
            + report.format()
        )
    return report
