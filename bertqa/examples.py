"""Questions as validated `Example`s: the types, flat records and the official SQuAD layout checked into them.

Flat records follow the Hugging Face `squad` schema (`id`, `title`, `context`, `question`,
`answers: {text: [...], answer_start: [...]}`) or the single-answer layout (`answer_text`, `answer_start`); a column
map renames other columns. `id` and `title` are optional (ids are then generated from the text, so they are stable),
an empty answer list means unanswerable, `is_impossible` is optional. Every problem names its place (file, line or
row, id, column). Reading files and datasets is `bertqa.loading`.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import unicodedata
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = [
    "COLUMNS",
    "STANDARD_COLUMNS",
    "ColumnsError",
    "Example",
    "LoadReport",
    "SquadFormatError",
    "examples_from_records",
    "is_v2",
    "parse_column_map",
    "parse_squad",
]

# The columns bertqa reads from flat records (a column map renames yours to these).
COLUMNS = ("id", "title", "context", "question", "answers", "answer_text", "answer_start", "is_impossible")

# The column map that names the standard columns, where one is needed to undo another (`eval_column_map`).
STANDARD_COLUMNS = "standard"

MismatchPolicy = Literal["repair", "error"]
_NOTED_REPAIRS = 3  # repairs named one by one in a load report's notes; the rest are counted
_NOTED_SKIPS = 3  # bad records named in a load report's notes when they are skipped; the rest are counted


class SquadFormatError(ValueError):
    """QA data that does not follow an accepted layout, or whose answers do not point at their text."""


class ColumnsError(SquadFormatError):
    """Flat records whose columns are not the ones bertqa reads, under the column map given."""


@dataclass(frozen=True, slots=True)
class Example:
    """One question. `answer_starts[i]` is the character offset of `answer_texts[i]` in `context`."""

    id: str
    title: str
    context: str
    question: str
    answer_texts: tuple[str, ...]
    answer_starts: tuple[int, ...]
    is_impossible: bool = False


@dataclass(frozen=True)
class LoadReport:
    """What loading found: counts, the SQuAD version, and how many answer offsets had to be repaired or located."""

    source: str
    version: str
    n_examples: int
    n_impossible: int
    n_answers: int
    n_repaired: int
    n_located: int = 0  # answers given without answer_start, placed at the first occurrence of their text
    n_generated_ids: int = 0
    # The questions behind the three counts above, so that a part of the data is reported on its own (`part`): the
    # id of each repaired or located answer (a question with two appears twice), each generated id.
    repaired_ids: tuple[str, ...] = field(default=(), repr=False)
    located_ids: tuple[str, ...] = field(default=(), repr=False)
    generated_ids: frozenset[str] = field(default=frozenset(), repr=False)
    # Answers located by a text that occurs more than once in their context (the first occurrence is taken): their
    # questions' ids, one per answer.
    ambiguous_ids: tuple[str, ...] = field(default=(), repr=False)
    n_skipped: int = 0  # bad records dropped (`skip_bad_records`); the first few are named in `notes`
    # Problems worth a warning line of their own, as (question id, or None for the whole source; the line).
    notes: tuple[tuple[str | None, str], ...] = ()

    def part(self, examples: Sequence[Example], source: str) -> LoadReport:
        """The report of `examples`, a part of what was loaded (an article range), named `source`."""
        ids = {ex.id for ex in examples}
        repaired = tuple(qid for qid in self.repaired_ids if qid in ids)
        located = tuple(qid for qid in self.located_ids if qid in ids)
        ambiguous = tuple(qid for qid in self.ambiguous_ids if qid in ids)
        return LoadReport(
            source=source,
            version="v2.0" if is_v2(examples) else "v1.1",
            n_examples=len(examples),
            n_impossible=sum(ex.is_impossible for ex in examples),
            n_answers=sum(len(ex.answer_texts) for ex in examples),
            n_repaired=len(repaired),
            n_located=len(located),
            n_generated_ids=len(self.generated_ids & ids),
            repaired_ids=repaired,
            located_ids=located,
            generated_ids=self.generated_ids & ids,
            ambiguous_ids=ambiguous,
            n_skipped=self.n_skipped,  # records dropped from the whole source: they belong to no part
            notes=tuple((qid, line) for qid, line in self.notes if qid is None or qid in ids),
        )

    @property
    def warnings(self) -> list[str]:
        """The lines to warn with (see `notes`)."""
        return [line for _, line in self.notes]

    def format(self) -> str:
        line = (
            f"{self.source}: {self.n_examples:,} questions ({self.n_impossible:,} unanswerable, SQuAD {self.version}), "
            f"{self.n_answers:,} answers, {self.n_repaired:,} answer offsets repaired"
        )
        if self.n_located:
            line += f", {self.n_located:,} answers located by their text (no answer_start)"
        if self.ambiguous_ids:
            line += f", {len(self.ambiguous_ids):,} of them by a text that occurs more than once (the first is taken)"
        if self.n_generated_ids:
            line += f", {self.n_generated_ids:,} ids generated"
        if self.n_skipped:
            line += f", {_records(self.n_skipped)} skipped"
        return line


def is_v2(examples: Iterable[Example]) -> bool:
    """SQuAD v2 data: some questions are unanswerable (scored with HasAns/NoAns and a no-answer threshold)."""
    return any(ex.is_impossible for ex in examples)


def parse_column_map(text: str | Mapping[str, str] | None) -> dict[str, str]:
    """`"id=qid,context=passage"` (or a dict) -> {bertqa column: your column}; unknown bertqa names are an error.
    `"standard"` (or nothing) is the standard columns themselves."""
    if not text or (isinstance(text, str) and text.strip().lower() == STANDARD_COLUMNS):
        return {}
    pairs = dict(text) if isinstance(text, Mapping) else {}
    if isinstance(text, str):
        for item in filter(None, (part.strip() for part in text.split(","))):
            ours, sep, theirs = (s.strip() for s in item.partition("="))
            if not sep or not ours or not theirs:
                raise ValueError(f"column map entry {item!r} is not NAME=COLUMN (e.g. 'context=passage')")
            pairs[ours] = theirs
    unknown = sorted(set(pairs) - set(COLUMNS))
    if unknown:
        raise ValueError(f"column map names unknown columns {unknown}; bertqa reads {', '.join(COLUMNS)}")
    return pairs


# ------------------------------------------------------------------------------------------------- flat records


def examples_from_records(
    columns: Mapping[str, Sequence[Any]],
    *,
    source: str,
    where: Callable[[int], str] = lambda i: f"row {i}",
    column_map: Mapping[str, str] | None = None,
    on_mismatch: MismatchPolicy = "repair",
    skip_bad_records: bool = False,
) -> tuple[list[Example], LoadReport]:
    """Validate flat records given as columns (name -> values) into examples; `where(i)` names record i's place.

    A record that is not valid raises, naming it; with `skip_bad_records` it is dropped instead, counted in the
    report, and the first few are named in its notes. A file or column layout that is wrong raises either way."""
    names = _mapped_columns(list(columns), dict(column_map or {}), source)
    n = len(next(iter(columns.values()), []))
    get: Callable[[str, int], Any] = lambda name, i: columns[names[name]][i] if name in names else None  # noqa: E731
    examples, places = [], []
    skipped = _Skipped(skip_bad_records)
    for i in range(n):
        try:
            example, place = _record(get, i, names, source, where)
        except SquadFormatError as err:
            skipped.drop(err, at=i)
            continue
        examples.append(example)
        places.append(place)
    given = [ex.id is not None for ex in examples]
    examples = _with_generated_ids(examples)
    made = frozenset(ex.id for ex, had in zip(examples, given) if not had)
    return _checked(
        examples,
        source=source,
        version="",
        on_mismatch=on_mismatch,
        places=places,
        positions=[place.i for place in places],
        generated_ids=made,
        skipped=skipped,
    )


def _record(
    get: Callable[[str, int], Any], i: int, names: dict[str, str], source: str, where: Callable[[int], str]
) -> tuple[Example, _Place]:
    """Record i as an example (its id None when it has none), and its place."""
    qid = get("id", i)
    if qid is None or qid == "":
        qid = None
    elif not isinstance(qid, (str, int)) or isinstance(qid, bool):
        place = _Place(source, where, i, None)
        raise SquadFormatError(f"{place}: column {names['id']!r}: an id must be text or a number, got {qid!r}")
    place = _Place(source, where, i, qid)
    texts, starts = _answers_of(get, i, names, place)
    example = _example(
        None if qid is None else str(qid),
        _text_or_empty(get("title", i), "title", names, place),
        get("context", i),
        get("question", i),
        texts,
        starts,
        is_impossible=_flag(get("is_impossible", i), names, place),
        where=place,
        names=names,
    )
    return example, place


class _Skipped:
    """The bad records dropped when `skip_bad_records` is on (each raises when it is off): how many, and the first
    few problems in the order of the source, each naming its record."""

    def __init__(self, on: bool) -> None:
        self.on, self.count = on, 0
        self.first: list[tuple[int, str]] = []  # (position in the source, the problem), the earliest few

    def drop(self, err: SquadFormatError, *, at: int, questions: int = 1) -> None:
        """Drop the record at position `at` (`questions` of them where a whole paragraph goes)."""
        if not self.on:
            raise SquadFormatError(f"{err} (skip_bad_records, --skip-bad-records: drop bad records instead)") from err
        self.count += questions
        bisect.insort(self.first, (at, str(err)))
        del self.first[_NOTED_SKIPS:]

    def named(self) -> str:
        """The first few problems, and "..." where there were more."""
        return "; ".join(problem for _, problem in self.first) + ("; ..." if self.count > len(self.first) else "")

    def notes(self, source: str) -> list[tuple[str | None, str]]:
        if not self.count:
            return []
        return [(None, f"{source}: {_records(self.count)} skipped (skip_bad_records): {self.named()}")]


def _records(n: int) -> str:
    return f"{n:,} bad record" + ("" if n == 1 else "s")


class _Place:
    """Where record i is ("file: line 7 (id 'q3')"), worked out only when a message needs it: finding a line
    number can mean reading the file again."""

    __slots__ = ("i", "qid", "source", "where")

    def __init__(self, source: str, where: Callable[[int], str], i: int, qid: Any) -> None:
        self.source, self.where, self.i, self.qid = source, where, i, qid

    def __str__(self) -> str:
        place = f"{self.source}: {self.where(self.i)}"
        return place if self.qid is None else f"{place} (id {self.qid!r})"

    def __format__(self, spec: str) -> str:
        return format(str(self), spec)


def _mapped_columns(available: list[str], column_map: dict[str, str], source: str) -> dict[str, str]:
    """{bertqa column: the record's column} for the columns present; the required ones must be there."""
    names = {ours: column_map.get(ours, ours) for ours in COLUMNS}
    missing_mapped = [f"{ours}={theirs}" for ours, theirs in column_map.items() if theirs not in available]
    if missing_mapped:
        raise ColumnsError(
            f"{source}: the column map names columns that are not there ({', '.join(missing_mapped)}); "
            f"the columns are: {', '.join(available)}"
        )
    present = {ours: theirs for ours, theirs in names.items() if theirs in available}
    needed = [name for name in ("context", "question") if name not in present]
    if "answers" not in present and "answer_text" not in present:
        needed.append("answers (or answer_text)")
    if needed:
        raise ColumnsError(
            f"{source}: missing column {', '.join(repr(n) for n in needed)}; the columns are: {', '.join(available)}. "
            'Name yours with --column-map, e.g. --column-map "context=passage,question=query,answer_text=gold"'
        )
    return present


def _answers_of(get: Callable[[str, int], Any], i: int, names: dict[str, str], place: str) -> tuple[list, list]:
    """(texts, starts) of record i from an `answers` column or the single-answer columns; a start may be None."""
    if "answers" in names:
        value = get("answers", i)
        column = names["answers"]
        if value is None:  # a misspelt or missing key must not turn a question unanswerable
            raise SquadFormatError(
                f"{place}: column {column!r} is missing or null; an unanswerable question has "
                '{"text": [], "answer_start": []}'
            )
        if isinstance(value, str):  # a CSV cell, or a JSON record that stores the object as text
            if not value.strip():
                return [], []  # an empty CSV cell: unanswerable
            try:
                value = json.loads(value)
            except json.JSONDecodeError as err:
                raise SquadFormatError(
                    f"{place}: column {column!r}: not JSON ({err.msg}); it holds {{'text': [...], 'answer_start': "
                    "[...]}, or name a column of single answer texts with answer_text (--column-map)"
                ) from err
        if isinstance(value, list):  # [{"text": ..., "answer_start": ...}, ...]
            if not all(isinstance(a, dict) for a in value):
                raise SquadFormatError(f"{place}: column {column!r}: expected objects with 'text' and 'answer_start'")
            value = {"text": [a.get("text") for a in value], "answer_start": [a.get("answer_start") for a in value]}
        if not isinstance(value, dict) or "text" not in value:
            raise SquadFormatError(
                f"{place}: column {column!r}: expected {{'text': [...], 'answer_start': [...]}}, got {value!r:.80}"
            )
        for key in ("text", "answer_start"):  # a bare string would be read as one answer per character
            if key in value and value[key] is not None and not isinstance(value[key], (list, tuple)):
                raise SquadFormatError(
                    f"{place}: column {column!r}: {key!r} must be a list (one entry per answer), got {value[key]!r:.80}"
                )
        texts, starts = list(value.get("text") or []), list(value.get("answer_start") or [None] * len(value["text"]))
        if len(texts) != len(starts):
            raise SquadFormatError(f"{place}: column {column!r}: {len(texts)} texts but {len(starts)} answer_start")
        return texts, [_start(s, column, place) for s in starts]
    text = get("answer_text", i)
    if text is None:
        raise SquadFormatError(
            f"{place}: column {names['answer_text']!r} is missing or null; for an unanswerable question leave it empty"
        )
    if text == "":
        return [], []
    return [text], [_start(get("answer_start", i), names.get("answer_start", "answer_start"), place)]


def _start(value: Any, column: str, place: str) -> int | None:
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise SquadFormatError(f"{place}: column {column!r}: answer_start must be a whole number, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    if not 0 <= number < float("inf") or number != int(number):  # nan and infinity fail the first test
        raise SquadFormatError(f"{place}: column {column!r}: answer_start must be a whole number >= 0, got {value!r}")
    return int(number)


def _flag(value: Any, names: dict[str, str], place: str) -> bool:
    if value is None or value == "":
        return False
    if isinstance(value, (bool, int)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in {"true", "false", "1", "0", "yes", "no"}:
        return value.strip().lower() in {"true", "1", "yes"}
    raise SquadFormatError(f"{place}: column {names['is_impossible']!r}: expected true or false, got {value!r}")


def _text_or_empty(value: Any, name: str, names: dict[str, str], place: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise SquadFormatError(f"{place}: column {names[name]!r}: expected text, got {type(value).__name__}")
    return value


def _with_generated_ids(examples: list[Example]) -> list[Example]:
    """Give examples without an id one made from their title, context and question: the same on every run and in
    every format. A repeated question in the same context gets `-2`, `-3`, ... in order."""
    seen: dict[str, int] = {}
    out = []
    for ex in examples:
        if ex.id is not None:
            out.append(ex)
            continue
        digest = hashlib.sha1("\x1f".join((ex.title, ex.context, ex.question)).encode()).hexdigest()[:16]
        seen[digest] = seen.get(digest, 0) + 1
        qid = digest if seen[digest] == 1 else f"{digest}-{seen[digest]}"
        out.append(Example(qid, ex.title, ex.context, ex.question, ex.answer_texts, ex.answer_starts, ex.is_impossible))
    return out


# --------------------------------------------------------------------------------------------- official layout


def parse_squad(
    raw: Any, *, source: str = "<json>", on_mismatch: MismatchPolicy = "repair", skip_bad_records: bool = False
) -> tuple[list[Example], LoadReport]:
    """Turn parsed official-layout SQuAD JSON into flat examples, checking every key on the way.

    See `load_squad` for the policy on answer offsets that do not point at their text. With `skip_bad_records` a
    bad question (or a paragraph without a usable context or question list) is dropped, counted and named in the
    report instead of raising.
    """
    if not isinstance(raw, dict) or not isinstance(raw.get("data"), list):
        raise SquadFormatError(f"{source}: expected a JSON object with a 'data' list (the official SQuAD layout)")
    version = str(raw.get("version", ""))
    examples: list[Example] = []
    places: list[str] = []
    positions: list[int] = []  # each example's question's position in the file, bad ones counted
    skipped = _Skipped(skip_bad_records)
    for a, article in enumerate(raw["data"]):
        title = _get(article, "title", str, f"{source}: data[{a}]")
        for p, paragraph in enumerate(_get(article, "paragraphs", list, f"{source}: data[{a}]")):
            where_p = f"{source}: data[{a}].paragraphs[{p}]"
            first = len(positions) + skipped.count
            try:
                context = _get(paragraph, "context", str, where_p)
                questions = _get(paragraph, "qas", list, where_p)
            except SquadFormatError as err:  # the paragraph's questions go with it
                held = paragraph.get("qas") if isinstance(paragraph, dict) else None
                skipped.drop(err, at=first, questions=len(held) if isinstance(held, list) and held else 1)
                continue
            for q, qa in enumerate(questions):
                where = f"{where_p}.qas[{q}]"
                if isinstance(qa, dict) and isinstance(qa.get("id"), str):
                    where += f" (id {qa['id']!r})"
                try:
                    examples.append(_official_question(qa, title, context, where))
                except SquadFormatError as err:
                    skipped.drop(err, at=first + q)
                    continue
                places.append(where)
                positions.append(first + q)
    return _checked(
        examples,
        source=source,
        version=version,
        on_mismatch=on_mismatch,
        places=places,
        positions=positions,
        skipped=skipped,
    )


def _official_question(qa: Any, title: str, context: str, where: str) -> Example:
    """One question of the official layout (`data[a].paragraphs[p].qas[q]`, named by `where`) as an example."""
    answers = _get(qa, "answers", list, where)
    texts = [_get(ans, "text", str, f"{where}.answers[{i}]") for i, ans in enumerate(answers)]
    starts = [_get(ans, "answer_start", int, f"{where}.answers[{i}]") for i, ans in enumerate(answers)]
    return _example(
        _get(qa, "id", str, where),
        title,
        context,
        _get(qa, "question", str, where),
        texts,
        starts,
        is_impossible=bool(qa.get("is_impossible", False)),
        where=where,
    )


def _get(obj: Any, key: str, kind: type, where: str) -> Any:
    if not isinstance(obj, dict):
        raise SquadFormatError(f"{where}: expected an object, got {type(obj).__name__}")
    if key not in obj:
        raise SquadFormatError(f"{where}: missing key {key!r}")
    if not isinstance(obj[key], kind):
        raise SquadFormatError(f"{where}.{key}: expected {kind.__name__}, got {type(obj[key]).__name__}")
    return obj[key]


# ------------------------------------------------------------------------------------------------------ checking


def _example(
    qid: str | None,
    title: str,
    context: Any,
    question: Any,
    texts: list,
    starts: list,
    *,
    is_impossible: bool,
    where: str,
    names: Mapping[str, str] | None = None,
) -> Example:
    """One example from raw values, each checked; `names` maps bertqa columns to the record's for messages."""
    label = (lambda name: f"column {names.get(name, name)!r}") if names is not None else repr
    for name, value in (("context", context), ("question", question)):
        if value is None:
            raise SquadFormatError(f"{where}: {label(name)} is missing or null")
        if not isinstance(value, str):
            raise SquadFormatError(f"{where}: {label(name)}: expected text, got {type(value).__name__}")
        if not value.strip():
            raise SquadFormatError(f"{where}: {label(name)} is empty")
    for text in texts:
        if not isinstance(text, str) or not text.strip():  # a blank answer has no tokens to label
            raise SquadFormatError(f"{where}: {label('answers')}: an answer text must be non-blank text, got {text!r}")
    if any(start is not None and start < 0 for start in starts):
        raise SquadFormatError(f"{where}: {label('answer_start')}: an answer_start must be >= 0, got {starts}")
    if texts and is_impossible:
        raise SquadFormatError(f"{where}: marked is_impossible but has answers {texts[:3]}")
    if not texts and names is None and not is_impossible:
        raise SquadFormatError(f"{where}: question {qid!r} has no answers but is not marked is_impossible")
    return Example(qid, title, context, question, tuple(texts), tuple(starts), is_impossible or not texts)  # type: ignore[arg-type]


def _checked(
    examples: list[Example],
    *,
    source: str,
    version: str,
    on_mismatch: MismatchPolicy,
    places: Sequence[Any] | None = None,
    positions: Sequence[int] | None = None,
    generated_ids: frozenset[str] = frozenset(),
    skipped: _Skipped | None = None,
) -> tuple[list[Example], LoadReport]:
    """Check ids are unique and every answer_start points at its text; repair, locate or raise as the policy says.

    `places[i]` names where example i is (file and line, or path in the layout) for the messages. The first few
    repairs are noted by place, and so is a source where most given offsets needed one (a column map that names
    the wrong column, or offsets counted in bytes or tokens). An example that cannot be made right raises, or is
    dropped into `skipped` when it skips bad records.
    """
    skipped = skipped or _Skipped(False)
    seen: dict[str, Any] = {}  # id -> its place, named only in a message (a file's line is found when asked)
    out: list[Example] = []
    counts = _Counts()
    for k, ex in enumerate(examples):
        place = places[k] if places is not None else source
        try:
            if ex.id in seen:
                raise SquadFormatError(f"{place}: question id {ex.id!r} appears twice (first at {seen[ex.id]})")
            out.append(_answers_checked(ex, place, on_mismatch, counts))
        except SquadFormatError as err:
            skipped.drop(err, at=positions[k] if positions is not None else k)
            continue
        seen[ex.id] = place
    if not out:
        also = f" ({_records(skipped.count)} skipped: {skipped.named()})" if skipped.count else ""
        raise SquadFormatError(f"{source}: holds no questions{also}")
    notes = counts.notes + _repair_totals(source, counts.n_repaired, counts.n_given)
    notes += _ambiguity_note(source, counts.ambiguous) + skipped.notes(source)
    generated = generated_ids & {ex.id for ex in out}  # a skipped record's generated id is gone with it
    report = LoadReport(
        source=source,
        version="v2.0" if is_v2(out) else "v1.1",
        n_examples=len(out),
        n_impossible=sum(ex.is_impossible for ex in out),
        n_answers=sum(len(ex.answer_texts) for ex in out),
        n_repaired=len(counts.repaired),
        n_located=len(counts.located),
        n_generated_ids=len(generated),
        repaired_ids=tuple(counts.repaired),
        located_ids=tuple(counts.located),
        generated_ids=generated,
        ambiguous_ids=tuple(qid for qid, _, _ in counts.ambiguous),
        n_skipped=skipped.count,
        notes=tuple(notes),
    )
    return out, report


@dataclass
class _Counts:
    """What checking the answers found so far: the question of each repaired and each located answer, the
    located ones whose text occurs more than once (id, text, occurrences), offsets given, notes on repairs."""

    repaired: list[str] = field(default_factory=list)
    located: list[str] = field(default_factory=list)
    ambiguous: list[tuple[str, str, int]] = field(default_factory=list)
    n_given: int = 0
    notes: list[tuple[str | None, str]] = field(default_factory=list)

    @property
    def n_repaired(self) -> int:
        return len(self.repaired)


def _answers_checked(ex: Example, place: Any, on_mismatch: MismatchPolicy, counts: _Counts) -> Example:
    """`ex` with every answer_start pointing at its text (repaired or located, and counted in `counts` once the
    whole example is good), or raised."""
    starts = list(ex.answer_starts)
    moved: list[tuple[str, int | None, int, str]] = []  # (text, the start given, where it was found, the problem)
    for i, (text, start) in enumerate(zip(ex.answer_texts, ex.answer_starts)):
        if start is not None and ex.context[start : start + len(text)] == text:
            continue
        starts[i], problem = _locate(ex, i, text, start, place=place, on_mismatch=on_mismatch)
        moved.append((text, start, starts[i], problem))
    counts.n_given += sum(start is not None for start in ex.answer_starts)
    for text, given, found, problem in moved:
        if given is None:
            counts.located.append(ex.id)
            if (n := _occurrences(ex.context, text)) > 1:
                counts.ambiguous.append((ex.id, text, n))
            continue
        counts.repaired.append(ex.id)
        if counts.n_repaired <= _NOTED_REPAIRS:
            counts.notes.append((ex.id, f"{problem}: moved to {found}, the nearest occurrence of the text"))
    return ex if starts == list(ex.answer_starts) else _replace_starts(ex, tuple(starts))


def _occurrences(context: str, text: str) -> int:
    """How many places `text` starts at in `context` (overlapping ones too)."""
    return len(_positions(context, text))


def _ambiguity_note(source: str, ambiguous: list[tuple[str, str, int]]) -> list[tuple[str | None, str]]:
    """A note on answers located by a text found more than once: the first occurrence may not be the one meant."""
    if not ambiguous:
        return []
    named = "; ".join(f"question {qid!r}: {text!r} occurs {n} times" for qid, text, n in ambiguous[:_NOTED_REPAIRS])
    more = f"; {len(ambiguous) - _NOTED_REPAIRS:,} more" if len(ambiguous) > _NOTED_REPAIRS else ""
    return [
        (
            None,
            f"{source}: {len(ambiguous):,} answers without answer_start were placed at the first of several "
            f"occurrences of their text in the context, which may not be the one meant ({named}{more}); give "
            "answer_start to say which",
        )
    ]


def _locate(
    ex: Example, i: int, text: str, start: int | None, *, place: str, on_mismatch: MismatchPolicy
) -> tuple[int, str]:
    """Where answer `i`'s text is in the context (the occurrence nearest `start`), and the problem as a message
    names it; raised when the text is nowhere in the context, or when `on_mismatch` says a wrong offset is an error."""
    found = _nearest_occurrence(ex.context, text, start or 0)
    problem = f"{place}: question {ex.id!r} answer {i} {text!r}"
    if start is not None:
        problem += f": answer_start {start} points at {ex.context[start : start + len(text)]!r}, not at the text"
    if found is None:
        same = unicodedata.normalize("NFC", text) in unicodedata.normalize("NFC", ex.context)
        hint = " (it does once both are Unicode-normalised: write them in one form, NFC)" if same else ""
        raise SquadFormatError(problem + "; the text does not occur in the context at all" + hint)
    if start is not None and on_mismatch == "error":
        raise SquadFormatError(problem + f" (it occurs at {found}; on_mismatch='repair' would move it there)")
    return found, problem


def _repair_totals(source: str, n_repaired: int, n_given: int) -> list[tuple[str | None, str]]:
    """Notes on a source's repairs past the ones named one by one, and on a source where most needed one."""
    notes: list[tuple[str | None, str]] = []
    if n_repaired > _NOTED_REPAIRS:
        notes.append((None, f"{source}: {n_repaired - _NOTED_REPAIRS:,} more answer offsets repaired"))
    if n_repaired >= 2 and n_repaired > n_given / 2:
        share = f"{n_repaired:,} of the {n_given:,} answer offsets given ({n_repaired / n_given:.0%})"
        question = (
            "is answer_start read from the right column (--column-map answer_start=COLUMN), and are the offsets "
            "counted in characters?"
        )
        notes.append((None, f"{source}: {share} did not point at their answer text and were moved: {question}"))
    return notes


def _replace_starts(ex: Example, starts: tuple[int, ...]) -> Example:
    return Example(ex.id, ex.title, ex.context, ex.question, ex.answer_texts, starts, ex.is_impossible)


def _nearest_occurrence(context: str, text: str, start: int) -> int | None:
    positions = _positions(context, text)
    return min(positions, key=lambda p: abs(p - start)) if positions else None


def _positions(context: str, text: str) -> list[int]:
    """Every place `text` starts at in `context`, overlapping ones too (none for an empty text)."""
    positions = []
    pos = context.find(text)
    while pos != -1 and text:
        positions.append(pos)
        pos = context.find(text, pos + 1)
    return positions
