"""QA examples into labelled token windows: tokenize them, label the answers, self-check the labels.

Everything here is a pure function on plain data (lists, numpy arrays, a tokenizer), so each step can be tested on
its own. Vocabulary: an *example* is one question with its context; a *feature* is one tokenized window of it.
Which examples a run uses is `bertqa.sources`; reading files is `bertqa.loading` and validating them
`bertqa.examples`. `Example` and `Features` are re-exported: they are what this module turns into what.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from bertqa.examples import Example
from bertqa.features import Features
from bertqa.metrics import normalize_answer

__all__ = [
    "Example",
    "Features",
    "LabelReport",
    "NoTokensError",
    "Window",
    "check_labels",
    "label_features",
    "tokenize_examples",
]


@dataclass(frozen=True)
class Window:
    """How examples are cut into token windows; the one place these defaults are written.

    `max_seq_length` tokens per window (question + context + special tokens), `doc_stride` tokens shared by
    consecutive windows of a long context, questions cut to `max_query_length` tokens.
    """

    max_seq_length: int = 384
    doc_stride: int = 128
    max_query_length: int = 64

    def context_room(self, n_special: int = 3) -> int:
        """Validate the settings; the number of context tokens one window has room for (at least)."""
        room = self.max_seq_length - self.max_query_length - n_special
        if room <= 0:
            raise ValueError(
                f"max_seq_length={self.max_seq_length} leaves no room for the context after a question of up to "
                f"max_query_length={self.max_query_length} tokens and {n_special} special tokens"
            )
        if not 0 <= self.doc_stride < room:
            raise ValueError(
                f"doc_stride={self.doc_stride} must be >= 0 and smaller than the context room of a window ({room} = "
                f"max_seq_length {self.max_seq_length} - max_query_length {self.max_query_length} - {n_special} "
                "special tokens): it is the number of tokens consecutive windows share, so it must leave room for "
                f"new text (a quarter of the room is usual: doc_stride={max(room // 4, 0)})"
            )
        return room

    def to_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Window:
        """The window settings among `values` (e.g. a saved `bertqa.json`); missing ones keep their defaults."""
        return cls(**{f.name: values[f.name] for f in dataclasses.fields(cls) if f.name in values})


# ------------------------------------------------------------------------------------------------------ tokenizing

NO_TOKENS = (
    "yields no tokens with this tokenizer (it holds only characters the tokenizer drops, such as zero-width spaces "
    "or control characters); fix or drop it"
)


def tokenize_examples(
    examples: Sequence[Example],
    tokenizer: Any,
    window: Window = Window(),
    *,
    batch_size: int = 1000,
    num_proc: int = 1,
) -> Features:
    """Cut question+context into overlapping windows (`window.doc_stride` tokens shared between neighbours).

    Questions lose leading whitespace and are cut to `window.max_query_length` tokens, so that every window keeps
    the same minimum room for the context; only the context is ever split (`only_second`). With `num_proc` > 1 the
    examples are cut into that many contiguous shards, tokenized in worker processes and joined in order: the
    result is the same as with one process.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError("tokenize_examples needs a fast tokenizer: character offsets come only from fast tokenizers")
    window.context_room(tokenizer.num_special_tokens_to_add(pair=True))
    if num_proc > 1 and len(examples) > 1:
        return _tokenize_in_processes(examples, tokenizer, window, num_proc=num_proc, batch_size=batch_size)
    return _tokenize(examples, tokenizer, window, batch_size=batch_size)


def _tokenize(examples: Sequence[Example], tokenizer: Any, window: Window, *, batch_size: int) -> Features:
    with_type_ids = "token_type_ids" in tokenizer.model_input_names
    parts = []
    for begin in range(0, len(examples), batch_size):
        chunk = examples[begin : begin + batch_size]
        questions, question_tokens = _cut_questions(
            [ex.question.lstrip() for ex in chunk], tokenizer, window.max_query_length
        )
        enc = tokenizer(
            questions,
            [ex.context for ex in chunk],
            truncation="only_second",
            max_length=window.max_seq_length,
            stride=window.doc_stride,
            return_overflowing_tokens=True,
            return_offsets_mapping=True,
            padding=False,
        )
        parts.append(_flat_windows(enc, tokenizer.cls_token_id, with_type_ids))
        _exact_offsets(parts[-1], [ex.context for ex in chunk])
        _refuse_tokenless(chunk, question_tokens, parts[-1])
    return Features.concat(parts, range(0, len(examples), batch_size)) if parts else _no_windows(with_type_ids)


def _flat_windows(enc: Any, cls_token_id: int | None, with_type_ids: bool) -> Features:
    """One tokenizer batch as flat arrays, built from iterators over all its windows at once (no per-window numpy)."""
    rows = enc["input_ids"]
    lengths = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))
    total = int(lengths.sum())
    chain = itertools.chain.from_iterable
    ids = np.fromiter(chain(rows), dtype=np.int32, count=total)
    offsets = np.fromiter(chain(chain(enc["offset_mapping"])), dtype=np.int32, count=2 * total).reshape(-1, 2)
    # sequence_ids marks the context tokens (1); everything else gets offset -1.
    in_context = np.fromiter((s == 1 for i in range(len(rows)) for s in enc.sequence_ids(i)), dtype=bool, count=total)
    offsets[~in_context] = -1
    return Features(
        bounds=np.concatenate([[0], np.cumsum(lengths)]),
        ids=ids,
        type_ids=np.fromiter(chain(enc["token_type_ids"]), dtype=np.int8, count=total) if with_type_ids else None,
        token_offsets=offsets,
        example_index=np.asarray(enc["overflow_to_sample_mapping"], dtype=np.int64),
        cls_index=np.asarray([row.index(cls_token_id) if cls_token_id in row else 0 for row in rows], dtype=np.int64),
    )


# What fast tokenizers' offsets get wrong, by family (WordPiece's are exact): Metaspace (SentencePiece: DeBERTa-v2/v3,
# XLM-R) puts the space a "▁" stands for into the token's span, and gives a lone "▁" at the start of the context the
# first character, which the next token has too; byte-level BPE (RoBERTa, GPT-2) gives every token that holds a byte
# of a character the whole character, so tokens overlap, and a lone space token an empty span; a normaliser that
# composes (NFC) or strips accents leaves the combining mark of a decomposed character out of every token.


def _exact_offsets(features: Features, contexts: Sequence[str]) -> None:
    """Make each context token's offsets the characters it stands for, in place, so that every span from one token
    to another slices the context as the model read it: whitespace at either end of a token is cut off; where
    tokens overlap, a character goes to the last of them (the one that completes it); a combining mark no token
    holds goes to the token before it; and a token left with no character (a lone space or "▁", part of a
    character) gets -1, as the tokens outside the context: no span starts or ends on it, spans run through it.

    Afterwards context offsets rise strictly, never overlap, and neither start nor end on whitespace. WordPiece's
    offsets are left as they are, but for a decomposed accent, which they too leave out.
    """
    ctx = np.flatnonzero(features.token_offsets[:, 0] >= 0)
    if not len(ctx):
        return
    # Each distinct context once (the questions of a paragraph share it), end to end, indexed by code point as
    # Python strings are; every token's span in that one text.
    slot: dict[int, int] = {}
    texts: list[str] = []
    for c in contexts:
        if id(c) not in slot:
            slot[id(c)] = len(texts)
            texts.append(c)
    base = np.concatenate([[0], np.cumsum([len(t) for t in texts])]).astype(np.int64)
    text = "".join(texts)
    space = np.isin(np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32), _whitespace())
    window = np.repeat(np.arange(len(features)), features.lengths)[ctx]
    which = np.array([slot[id(c)] for c in contexts], dtype=np.int64)[features.example_index[window]]
    first, stop = base[which], base[which + 1]
    start = np.clip(features.token_offsets[ctx, 0].astype(np.int64) + first, first, stop)
    end = np.clip(features.token_offsets[ctx, 1].astype(np.int64) + first, start, stop)
    solid = _solid_edges(space)
    start, end = _trim(start, end, solid)
    end = _clip_overlaps(start, end, window, first, len(text) + 1)
    start, end = _trim(start, end, solid)  # a clipped end may now follow whitespace
    end = _take_marks(start, end, stop, text, space)
    kept = start < end
    features.token_offsets[ctx] = np.where(kept[:, None], np.stack([start - first, end - first], axis=1), -1)


@functools.cache
def _whitespace() -> np.ndarray:
    """The code points `str.isspace` calls whitespace (as `_char_span` does); none lies above U+3000."""
    return np.array([c for c in range(0x3001) if chr(c).isspace()], dtype=np.uint32)


def _solid_edges(space: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For every position k of a text (and its end): the first position at or after k that is not whitespace, and
    1 + the last one before k (0 if none)."""
    n = len(space)
    positions = np.arange(n + 1)
    first_after = np.minimum.accumulate(np.where(np.append(~space, True), positions, n)[::-1])[::-1]
    last_before = np.concatenate([[0], np.maximum.accumulate(np.where(~space, positions[1:], 0))])
    return first_after, last_before


def _trim(start: np.ndarray, end: np.ndarray, solid: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Spans [start, end) with the whitespace at both ends cut off (`_solid_edges`); one of whitespace only ends
    empty."""
    first_after, last_before = solid
    start = np.minimum(first_after[start], end)
    return start, np.maximum(last_before[end], start)


def _clip_overlaps(start: np.ndarray, end: np.ndarray, window: np.ndarray, first: np.ndarray, big: int) -> np.ndarray:
    """Ends cut back to the start of any later token of the same window: a character held by several tokens stays
    with the last, and a token that starts at or after a later one is left empty."""
    local = np.where(start < end, start - first + window * big, np.iinfo(np.int64).max)
    # The smallest start of the tokens after each one; a later window's comes out `big` or more past any end.
    later = np.append(np.minimum.accumulate(local[::-1])[::-1][1:], np.iinfo(np.int64).max)
    later = np.where(later == np.iinfo(np.int64).max, later, later - window * big + first)
    return np.maximum(np.minimum(end, later), start)


def _take_marks(start: np.ndarray, end: np.ndarray, stop: np.ndarray, text: str, space: np.ndarray) -> np.ndarray:
    """Ends moved past the combining marks (accents of decomposed letters, variation selectors) right after a
    token that no token holds: a normaliser folded them into the letter before them, so they are part of it."""
    kept = start < end
    cover = np.zeros(len(space) + 1, dtype=np.int64)
    np.add.at(cover, start[kept], 1)
    np.add.at(cover, end[kept], -1)
    held = np.append(np.cumsum(cover)[:-1] > 0, True)
    maybe = kept & (end < stop)
    maybe[maybe] = ~held[end[maybe]] & ~space[end[maybe]]
    end = end.copy()
    for i in np.flatnonzero(maybe).tolist():  # rare: characters the tokenizer dropped
        k = int(end[i])
        while k < stop[i] and not held[k] and unicodedata.category(text[k]).startswith("M"):
            k += 1
        end[i] = k
    return end


def _no_windows(with_type_ids: bool) -> Features:
    empty = np.zeros(0, dtype=np.int64)
    type_ids = np.zeros(0, dtype=np.int8) if with_type_ids else None
    return Features(np.zeros(1, np.int64), np.zeros(0, np.int32), type_ids, np.zeros((0, 2), np.int32), empty, empty)


def _tokenize_in_processes(
    examples: Sequence[Example], tokenizer: Any, window: Window, *, num_proc: int, batch_size: int
) -> Features:
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
        same = [(tokenizer, window, batch_size)] * len(shards)
        parts = list(pool.map(_tokenize_shard, shards, *zip(*same)))
    return Features.concat(parts, bounds[:-1].tolist())


def _tokenize_shard(examples: list[Example], tokenizer: Any, window: Window, batch_size: int) -> Features:
    # One worker per core already: the tokenizer's thread pool would only compete with the other workers.
    import os

    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    return _tokenize(examples, tokenizer, window, batch_size=batch_size)


def _cut_questions(questions: list[str], tokenizer: Any, max_query_length: int) -> tuple[list[str], list[int]]:
    """Cut each question after its `max_query_length`-th token (by character offset, so the text stays intact);
    with each question's number of tokens before the cut."""
    enc = tokenizer(questions, add_special_tokens=False, return_offsets_mapping=True)
    out = []
    for question, offs in zip(questions, enc["offset_mapping"]):
        out.append(question[: offs[max_query_length - 1][1]] if len(offs) > max_query_length else question)
    return out, [len(offs) for offs in enc["offset_mapping"]]


class NoTokensError(ValueError):
    """A question or context that is not blank but yields no tokens; `example_id` and `field` say which."""

    def __init__(self, message: str, *, example_id: str, field: str) -> None:
        super().__init__(message)
        self.example_id, self.field = example_id, field

    def __reduce__(self) -> tuple[Any, ...]:  # raised in tokenizing worker processes: it must survive pickling
        return _no_tokens_error, (str(self), self.example_id, self.field)


def _no_tokens_error(message: str, example_id: str, field: str) -> NoTokensError:
    return NoTokensError(message, example_id=example_id, field=field)


def _refuse_tokenless(examples: Sequence[Example], question_tokens: Sequence[int], features: Features) -> None:
    """A question or context that is not blank but that the tokenizer turns into no tokens at all (zero-width
    spaces, control characters) would train on and be scored as a question about nothing: refuse it by id."""
    windows_with_context = np.add.reduceat(features.token_offsets[:, 0] >= 0, features.bounds[:-1]) > 0
    has_context = np.zeros(len(examples), dtype=bool)
    has_context[features.example_index[windows_with_context]] = True
    bad = [(ex, "question", ex.question) for ex, n in zip(examples, question_tokens) if n == 0]
    bad += [(examples[i], "context", examples[i].context) for i in np.flatnonzero(~has_context).tolist()]
    if bad:
        ex, what, text = bad[0]
        title = f" (title {ex.title!r})" if ex.title else ""
        raise NoTokensError(
            f"example {ex.id!r}{title}: its {what} {text[:60]!r} {NO_TOKENS}"
            + (f" ({len(bad)} such questions or contexts in this batch)" if len(bad) > 1 else ""),
            example_id=ex.id,
            field=what,
        )


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
    ctx = np.flatnonzero(offsets[:, 0] >= 0)  # context tokens that hold characters (`_exact_offsets`)
    if len(ctx) == 0:
        return None
    if offsets[ctx[0], 0] > start_char or offsets[ctx[-1], 1] < end_char:
        return None
    # Context offsets rise strictly, so the boundary tokens are binary searches.
    tok_start = ctx[np.searchsorted(offsets[ctx, 0], start_char, side="right") - 1]
    tok_end = ctx[np.searchsorted(offsets[ctx, 1], end_char, side="left")]
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
