"""Reading QA data into validated `Example`s: bundled SQuAD names, SQuAD JSON, flat records, hub datasets.

Accepted sources:
- the official nested SQuAD layout (`.json`, `.json.gz`) and the bundled short names (`train-v1.1`, ...);
- flat records in the Hugging Face `squad` schema (`id`, `title`, `context`, `question`,
  `answers: {text: [...], answer_start: [...]}`) as `.jsonl`, `.json` (a list of records), `.parquet` or `.csv`
  (an `answers` cell of a CSV holds that object as JSON text);
- the single-answer layout, `answer_text` and `answer_start` columns instead of `answers` (natural for CSV);
- any hub dataset id with an optional `:split`, and a `datasets.Dataset` object.
A column mapping (`"context=passage,question=query"`) renames other columns. `id` and `title` are optional (ids are
then generated from the text, so they are stable), an empty answer list means unanswerable, `is_impossible` is
optional. JSONL, CSV, Parquet and the hub are read by `datasets`; bertqa validates on top, and every problem names
its place (file, line or row, id, column). Nothing here tokenizes: that is `bertqa.data`.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

__all__ = [
    "BUNDLED",
    "COLUMNS",
    "FORMATS",
    "Example",
    "LoadReport",
    "SquadFormatError",
    "as_examples",
    "examples_from_records",
    "is_v2",
    "load_squad",
    "parse_column_map",
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
# File endings -> format; each text format may also be gzipped (`.jsonl.gz`).
FORMATS = {".json": "json", ".jsonl": "jsonl", ".csv": "csv", ".parquet": "parquet"}
# The columns bertqa reads from flat records (a column map renames yours to these).
COLUMNS = ("id", "title", "context", "question", "answers", "answer_text", "answer_start", "is_impossible")

MismatchPolicy = Literal["repair", "error"]


class SquadFormatError(ValueError):
    """QA data that does not follow an accepted layout, or whose answers do not point at their text."""


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

    def format(self) -> str:
        line = (
            f"{self.source}: {self.n_examples:,} questions ({self.n_impossible:,} unanswerable, SQuAD {self.version}), "
            f"{self.n_answers:,} answers, {self.n_repaired:,} answer offsets repaired"
        )
        if self.n_located:
            line += f", {self.n_located:,} answers located by their text (no answer_start)"
        if self.n_generated_ids:
            line += f", {self.n_generated_ids:,} ids generated"
        return line


def is_v2(examples: Iterable[Example]) -> bool:
    """SQuAD v2 data: some questions are unanswerable (scored with HasAns/NoAns and a no-answer threshold)."""
    return any(ex.is_impossible for ex in examples)


def parse_column_map(text: str | Mapping[str, str] | None) -> dict[str, str]:
    """`"id=qid,context=passage"` (or a dict) -> {bertqa column: your column}; unknown bertqa names are an error."""
    if not text:
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


def load_squad(
    source: str | Path | Any,
    *,
    on_mismatch: MismatchPolicy = "repair",
    column_map: str | Mapping[str, str] | None = None,
) -> tuple[list[Example], LoadReport]:
    """Load and validate examples from any accepted source (see the module docstring).

    Policy for an `answer_start` that does not point at its answer text: with `"repair"` (the default) the start moves
    to the nearest occurrence of the text in the context and is counted in `LoadReport.n_repaired`; with `"error"`
    it raises. An answer whose text does not occur in its context at all always raises: no offset can be right.
    """
    columns = parse_column_map(column_map)
    if _is_dataset(source):
        name = f"datasets.Dataset({source.info.dataset_name or 'in memory'})"
        return _from_dataset(source, source=name, column_map=columns, on_mismatch=on_mismatch)
    path = Path(resolve_source(source))
    if path.exists():
        return _read_file(path, column_map=columns, on_mismatch=on_mismatch)
    if _format_of(path) is not None or str(source).startswith((".", "/", "~")):
        raise FileNotFoundError(f"data file not found: {path}")
    return _load_hub(str(source), column_map=columns, on_mismatch=on_mismatch)


def as_examples(data: Sequence[Example] | Any, *, column_map: str | Mapping[str, str] | None = None) -> list[Example]:
    """Examples as given, or converted from a `datasets.Dataset` of records."""
    if _is_dataset(data):
        return load_squad(data, column_map=column_map)[0]
    return list(data)


# ------------------------------------------------------------------------------------------------------ files, hub


def _format_of(path: Path) -> str | None:
    suffixes = [s.lower() for s in path.suffixes[-2:]]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    return FORMATS.get(suffixes[-1]) if suffixes else None


def _read_file(
    path: Path, *, column_map: dict[str, str], on_mismatch: MismatchPolicy
) -> tuple[list[Example], LoadReport]:
    kind = _format_of(path)
    if path.is_dir() or kind is None:
        raise SquadFormatError(
            f"{path}: unknown data format; accepted: {', '.join(FORMATS)} files (text formats may be gzipped: "
            ".json.gz, .jsonl.gz, .csv.gz), a bundled name ({', '.join(BUNDLED)}) or a hub dataset id"
        )
    if kind == "json":
        raw = _read_json(path)
        if isinstance(raw, dict) and "data" in raw:
            return parse_squad(raw, source=str(path), on_mismatch=on_mismatch)
        if not isinstance(raw, list) or not all(isinstance(row, dict) for row in raw):
            raise SquadFormatError(
                f"{path}: expected the official SQuAD layout (an object with a 'data' list) or a list of records"
            )
        columns = {name: [row.get(name) for row in raw] for name in dict.fromkeys(k for row in raw for k in row)}
        return examples_from_records(columns, source=str(path), where=lambda i: f"record {i}",
                                     column_map=column_map, on_mismatch=on_mismatch)  # fmt: skip
    columns = _read_with_datasets(path, kind)
    where = (lambda i: f"line {_jsonl_line(path, i)}") if kind == "jsonl" else _row_namer(kind)
    return examples_from_records(columns, source=str(path), where=where, column_map=column_map, on_mismatch=on_mismatch)


def _row_namer(kind: str) -> Callable[[int], str]:
    # A CSV's first line is its header, so record i is on line i + 2.
    return (lambda i: f"line {i + 2}") if kind == "csv" else (lambda i: f"row {i}")


def _text(path: Path) -> str:
    """The file's text; an empty file or one that is not UTF-8 is named, with the place of the first bad byte."""
    data = gzip.decompress(path.read_bytes()) if path.suffix.lower() == ".gz" else path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise SquadFormatError(
            f"{path}: not UTF-8 text: byte {err.start} (line {line}) is {data[err.start : err.start + 1]!r}"
        ) from err
    if not text.strip():
        raise SquadFormatError(f"{path}: the file is empty")
    return text


def _read_json(path: Path) -> Any:
    try:
        return json.loads(_text(path))
    except json.JSONDecodeError as err:
        raise SquadFormatError(f"{path}: not valid JSON at line {err.lineno} column {err.colno}: {err.msg}") from err


def _read_with_datasets(path: Path, kind: str) -> dict[str, list]:
    """Columns of a JSONL/CSV/Parquet file read by `datasets`; when it fails, the cause is found and named."""
    if kind != "parquet":
        text = _text(path)  # empty or not UTF-8: said plainly, before datasets reports it its own way
    import datasets

    builder = {"jsonl": "json", "csv": "csv", "parquet": "parquet"}[kind]
    # CSV: every cell as text, so ids keep their leading zeros and empty cells stay "" (bertqa converts the rest).
    options = {"dtype": str, "keep_default_na": False} if kind == "csv" else {}
    try:
        with _quiet_datasets(datasets):
            dataset = datasets.load_dataset(builder, data_files=str(path), split="train", **options)
    except Exception as err:  # datasets raises many kinds; each is turned into one message naming the file
        if kind == "jsonl":
            return _jsonl_columns(path, text, err)
        raise SquadFormatError(f"{path}: not readable as {kind.upper()} ({type(err).__name__}: {err})") from err
    return dataset.to_dict()


def _jsonl_columns(path: Path, text: str, err: Exception) -> dict[str, list]:
    """After `datasets` failed on a JSONL file: name the first bad line, or (every line being a JSON object, e.g.
    ids that are numbers on some lines and text on others) take the records line by line."""
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as bad:
            raise SquadFormatError(f"{path}: line {number} is not valid JSON (column {bad.colno}: {bad.msg})") from err
        if not isinstance(row, dict):
            raise SquadFormatError(f"{path}: line {number} is not a JSON object but {type(row).__name__}") from err
        rows.append(row)
    return {name: [row.get(name) for row in rows] for name in dict.fromkeys(k for row in rows for k in row)}


def _jsonl_line(path: Path, record: int) -> int:
    """The line number of the `record`-th record of a JSONL file (blank lines hold none)."""
    lines = [n for n, line in enumerate(_text(path).splitlines(), start=1) if line.strip()]
    return lines[record] if record < len(lines) else record + 1


class _quiet_datasets:  # noqa: N801 - used as a context manager
    """Hide datasets' per-file progress bars while reading a local file."""

    def __init__(self, datasets: Any) -> None:
        self.utils = datasets.utils.logging
        self.was_enabled = self.utils.is_progress_bar_enabled()

    def __enter__(self) -> None:
        self.utils.disable_progress_bar()

    def __exit__(self, *exc: object) -> None:
        if self.was_enabled:
            self.utils.enable_progress_bar()


def _is_dataset(obj: Any) -> bool:
    return type(obj).__module__.startswith("datasets") and hasattr(obj, "column_names") and hasattr(obj, "to_dict")


def _load_hub(
    name: str, *, column_map: dict[str, str], on_mismatch: MismatchPolicy
) -> tuple[list[Example], LoadReport]:
    """A hub dataset `name` or `name:split` (default split `train`); needs internet or the datasets cache."""
    import datasets

    dataset_name, _, split = name.partition(":")
    try:
        dataset = datasets.load_dataset(dataset_name, split=split or "train")
    except Exception as err:  # offline, unknown id, unknown split: all end here
        raise FileNotFoundError(
            f"{name!r} is neither a file, a bundled name ({', '.join(BUNDLED)}) nor a hub dataset that could be "
            f"loaded (add ':validation' for a split; offline?): {type(err).__name__}: {err}"
        ) from err
    return _from_dataset(dataset, source=name, column_map=column_map, on_mismatch=on_mismatch)


def _from_dataset(
    dataset: Any, *, source: str, column_map: dict[str, str], on_mismatch: MismatchPolicy
) -> tuple[list[Example], LoadReport]:
    return examples_from_records(dataset.to_dict(), source=source, where=lambda i: f"row {i}",
                                 column_map=column_map, on_mismatch=on_mismatch)  # fmt: skip


# ------------------------------------------------------------------------------------------------- flat records


def examples_from_records(
    columns: Mapping[str, Sequence[Any]],
    *,
    source: str,
    where: Callable[[int], str] = lambda i: f"row {i}",
    column_map: Mapping[str, str] | None = None,
    on_mismatch: MismatchPolicy = "repair",
) -> tuple[list[Example], LoadReport]:
    """Validate flat records given as columns (name -> values) into examples; `where(i)` names record i's place."""
    names = _mapped_columns(list(columns), dict(column_map or {}), source)
    n = len(next(iter(columns.values()), []))
    get: Callable[[str, int], Any] = lambda name, i: columns[names[name]][i] if name in names else None  # noqa: E731
    examples, generated = [], 0
    for i in range(n):
        place = f"{source}: {where(i)}"
        qid = get("id", i)
        if qid is None or qid == "":
            qid, generated = None, generated + 1
        elif not isinstance(qid, (str, int)) or isinstance(qid, bool):
            raise SquadFormatError(f"{place}: column {names['id']!r}: an id must be text or a number, got {qid!r}")
        place = place if qid is None else f"{place} (id {qid!r})"
        texts, starts = _answers_of(get, i, names, place)
        examples.append(_example(
            None if qid is None else str(qid), _text_or_empty(get("title", i), "title", names, place),
            get("context", i), get("question", i), texts, starts,
            is_impossible=_flag(get("is_impossible", i), names, place), where=place, names=names,
        ))  # fmt: skip
    examples = _with_generated_ids(examples)
    return _checked(examples, source=source, version="", on_mismatch=on_mismatch, n_generated_ids=generated)


def _mapped_columns(available: list[str], column_map: dict[str, str], source: str) -> dict[str, str]:
    """{bertqa column: the record's column} for the columns present; the required ones must be there."""
    names = {ours: column_map.get(ours, ours) for ours in COLUMNS}
    missing_mapped = [f"{ours}={theirs}" for ours, theirs in column_map.items() if theirs not in available]
    if missing_mapped:
        raise SquadFormatError(
            f"{source}: the column map names columns that are not there ({', '.join(missing_mapped)}); "
            f"the columns are: {', '.join(available)}"
        )
    present = {ours: theirs for ours, theirs in names.items() if theirs in available}
    needed = [name for name in ("context", "question") if name not in present]
    if "answers" not in present and "answer_text" not in present:
        needed.append("answers (or answer_text)")
    if needed:
        raise SquadFormatError(
            f"{source}: missing column {', '.join(repr(n) for n in needed)}; the columns are: {', '.join(available)}. "
            'Name yours with --column-map, e.g. --column-map "context=passage,question=query,answer_text=gold"'
        )
    return present


def _answers_of(get: Callable[[str, int], Any], i: int, names: dict[str, str], place: str) -> tuple[list, list]:
    """(texts, starts) of record i from an `answers` column or the single-answer columns; a start may be None."""
    if "answers" in names:
        value = get("answers", i)
        column = names["answers"]
        if isinstance(value, str):  # a CSV cell, or a JSON record that stores the object as text
            try:
                value = json.loads(value) if value.strip() else None
            except json.JSONDecodeError as err:
                raise SquadFormatError(f"{place}: column {column!r}: not JSON ({err.msg})") from err
        if value is None:
            return [], []
        if isinstance(value, list):  # [{"text": ..., "answer_start": ...}, ...]
            if not all(isinstance(a, dict) for a in value):
                raise SquadFormatError(f"{place}: column {column!r}: expected objects with 'text' and 'answer_start'")
            value = {"text": [a.get("text") for a in value], "answer_start": [a.get("answer_start") for a in value]}
        if not isinstance(value, dict) or "text" not in value:
            raise SquadFormatError(
                f"{place}: column {column!r}: expected {{'text': [...], 'answer_start': [...]}}, got {value!r:.80}"
            )
        texts, starts = list(value.get("text") or []), list(value.get("answer_start") or [None] * len(value["text"]))
        if len(texts) != len(starts):
            raise SquadFormatError(f"{place}: column {column!r}: {len(texts)} texts but {len(starts)} answer_start")
        return texts, [_start(s, column, place) for s in starts]
    text = get("answer_text", i)
    if text is None or text == "":
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
    if number != number or number != int(number) or number < 0:
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
    raw: Any, *, source: str = "<json>", on_mismatch: MismatchPolicy = "repair"
) -> tuple[list[Example], LoadReport]:
    """Turn parsed official-layout SQuAD JSON into flat examples, checking every key on the way.

    See `load_squad` for the policy on answer offsets that do not point at their text.
    """
    if not isinstance(raw, dict) or not isinstance(raw.get("data"), list):
        raise SquadFormatError(f"{source}: expected a JSON object with a 'data' list (the official SQuAD layout)")
    version = str(raw.get("version", ""))
    examples: list[Example] = []
    for a, article in enumerate(raw["data"]):
        title = _get(article, "title", str, f"{source}: data[{a}]")
        for p, paragraph in enumerate(_get(article, "paragraphs", list, f"{source}: data[{a}]")):
            where_p = f"{source}: data[{a}].paragraphs[{p}]"
            context = _get(paragraph, "context", str, where_p)
            for q, qa in enumerate(_get(paragraph, "qas", list, where_p)):
                where = f"{where_p}.qas[{q}]"
                answers = _get(qa, "answers", list, where)
                texts = [_get(ans, "text", str, f"{where}.answers[{i}]") for i, ans in enumerate(answers)]
                starts = [_get(ans, "answer_start", int, f"{where}.answers[{i}]") for i, ans in enumerate(answers)]
                examples.append(_example(
                    _get(qa, "id", str, where), title, context, _get(qa, "question", str, where), texts, starts,
                    is_impossible=bool(qa.get("is_impossible", False)), where=where,
                ))  # fmt: skip
    return _checked(examples, source=source, version=version, on_mismatch=on_mismatch)


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
        if not isinstance(value, str):
            raise SquadFormatError(f"{where}: {label(name)}: expected text, got {type(value).__name__}")
        if not value.strip():
            raise SquadFormatError(f"{where}: {label(name)} is empty")
    for text in texts:
        if not isinstance(text, str) or not text:
            raise SquadFormatError(f"{where}: {label('answers')}: an answer text must be non-empty text, got {text!r}")
    if texts and is_impossible:
        raise SquadFormatError(f"{where}: marked is_impossible but has answers {texts[:3]}")
    if not texts and names is None and not is_impossible:
        raise SquadFormatError(f"{where}: question {qid!r} has no answers but is not marked is_impossible")
    return Example(qid, title, context, question, tuple(texts), tuple(starts), is_impossible or not texts)  # type: ignore[arg-type]


def _checked(
    examples: list[Example], *, source: str, version: str, on_mismatch: MismatchPolicy, n_generated_ids: int = 0
) -> tuple[list[Example], LoadReport]:
    """Check ids are unique and every answer_start points at its text; repair, locate or raise as the policy says."""
    seen: set[str] = set()
    out: list[Example] = []
    n_repaired = n_located = 0
    for ex in examples:
        if ex.id in seen:
            raise SquadFormatError(f"{source}: question id {ex.id!r} appears twice")
        seen.add(ex.id)
        starts = list(ex.answer_starts)
        for i, (text, start) in enumerate(zip(ex.answer_texts, ex.answer_starts)):
            if start is not None and ex.context[start : start + len(text)] == text:
                continue
            found = _nearest_occurrence(ex.context, text, start or 0)
            problem = f"{source}: question {ex.id!r} answer {i} {text!r}"
            if start is not None:
                problem += (
                    f": answer_start {start} points at {ex.context[start : start + len(text)]!r}, not at the text"
                )
            if found is None:
                raise SquadFormatError(problem + "; the text does not occur in the context at all")
            if start is not None and on_mismatch == "error":
                raise SquadFormatError(problem + f" (it occurs at {found}; on_mismatch='repair' would move it there)")
            starts[i] = found
            n_repaired, n_located = n_repaired + (start is not None), n_located + (start is None)
        out.append(ex if starts == list(ex.answer_starts) else _replace_starts(ex, tuple(starts)))
    if not out:
        raise SquadFormatError(f"{source}: holds no questions")
    v2 = is_v2(out)
    version = "v2.0" if v2 and not version.startswith("v2") else (version or "1.1")
    report = LoadReport(
        source=source,
        version=version,
        n_examples=len(out),
        n_impossible=sum(ex.is_impossible for ex in out),
        n_answers=sum(len(ex.answer_texts) for ex in out),
        n_repaired=n_repaired,
        n_located=n_located,
        n_generated_ids=n_generated_ids,
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
