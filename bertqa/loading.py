"""Reading QA data: bundled SQuAD names, files in several formats, hub datasets and `datasets.Dataset` objects.

Accepted sources:
- the official nested SQuAD layout (`.json`, `.json.gz`) and the bundled short names (`train-v1.1`, ...);
- flat records (see `bertqa.examples`) as `.jsonl`, `.json` (a list of records), `.parquet` or `.csv` (an
  `answers` cell of a CSV holds the answers object as JSON text; text formats may be gzipped);
- any hub dataset id with an optional `:split`, and a `datasets.Dataset` object.
JSONL, CSV, Parquet and the hub are read by `datasets`; when it cannot read a file, the cause is found and named
(an empty file, the first byte that is not UTF-8, the first line that is not JSON). Validation is `bertqa.examples`.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import gzip
import io
import json
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bertqa.examples import (
    Example,
    LoadReport,
    MismatchPolicy,
    SquadFormatError,
    examples_from_records,
    parse_column_map,
    parse_squad,
)

logger = logging.getLogger("bertqa")

__all__ = ["BUNDLED", "FORMATS", "as_examples", "given_examples", "load_squad", "read_records", "resolve_source"]

DATA_DIR = Path(__file__).resolve().parent.parent / "data" / "squad"
# Short names for the SQuAD files shipped in data/squad/ (see its MANIFEST.md).
BUNDLED = {
    "train-v1.1": DATA_DIR / "train-v1.1.json.gz",
    "dev-v1.1": DATA_DIR / "dev-v1.1.json.gz",
    "dev-v2.0": DATA_DIR / "dev-v2.0.json.gz",
}
# File endings -> format; each text format may also be gzipped (`.jsonl.gz`).
FORMATS = {".json": "json", ".jsonl": "jsonl", ".csv": "csv", ".parquet": "parquet"}


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
    skip_bad_records: bool = False,
) -> tuple[list[Example], LoadReport]:
    """Load and validate examples from any accepted source (see the module docstring).

    Policy for an `answer_start` that does not point at its answer text: with `"repair"` (the default) the start moves
    to the nearest occurrence of the text in the context and is counted in `LoadReport.n_repaired`; with `"error"`
    it raises. An answer whose text does not occur in its context at all always raises: no offset can be right.
    A record that is not valid raises, naming its place; with `skip_bad_records` it is dropped, counted in the
    report (`n_skipped`) and the first few are named in its warnings.
    """
    read = _Reading(parse_column_map(column_map), on_mismatch, skip_bad_records)
    if _is_dataset(source):
        return _from_dataset(source, source=f"datasets.Dataset({source.info.dataset_name or 'in memory'})", read=read)
    path = Path(resolve_source(source))
    if path.exists():
        return _read_file(path, read=read)
    if _format_of(path) is not None or str(source).startswith((".", "/", "~")):
        raise FileNotFoundError(f"data file not found: {path}")
    return _load_hub(str(source), read=read)


def as_examples(
    data: Sequence[Example] | Any,
    *,
    column_map: str | Mapping[str, str] | None = None,
    name: str = "examples",
    skip_bad_records: bool = False,
) -> list[Example]:
    """Examples given from Python, checked as `given_examples` checks them."""
    return given_examples(data, column_map=column_map, name=name, skip_bad_records=skip_bad_records)[0]


def given_examples(
    data: Sequence[Example] | Any,
    *,
    column_map: str | Mapping[str, str] | None = None,
    name: str = "examples",
    skip_bad_records: bool = False,
) -> tuple[list[Example], LoadReport | None]:
    """Examples given from Python, and what loading them found (None for `Example`s, which are taken as they are).

    Accepted: `Example`s; records in the schema the files use (dicts with `context`, `question`, `answers` or
    `answer_text`, optionally `id`, `title`, `answer_start`), validated as a file's records are, each problem named
    by `name` and the record's index and id; a `datasets.Dataset` of such records. Anything else is a TypeError.
    """
    if _is_dataset(data):
        return load_squad(data, column_map=column_map, skip_bad_records=skip_bad_records)
    accepted = (
        "give bertqa.examples.Example objects, records in the file schema (dicts with 'context', 'question' and "
        "'answers' {'text': [...], 'answer_start': [...]} or 'answer_text'), or a datasets.Dataset of records"
    )
    if isinstance(data, (str, bytes, Path, Mapping)) or not isinstance(data, Iterable):
        hint = (
            " (a path or source name goes in TrainConfig.train_data / eval_data)"
            if isinstance(data, (str, Path))
            else ""
        )
        raise TypeError(f"{name}: got a {type(data).__name__}{hint}; {accepted}")
    items = list(data)
    if not items:
        raise ValueError(f"{name}: no examples were given")
    if all(isinstance(item, Example) for item in items):
        return items, None
    if all(isinstance(item, Mapping) for item in items):
        keys = list(dict.fromkeys(key for item in items for key in item))
        columns = {key: [item.get(key) for item in items] for key in keys}
        read = _Reading(parse_column_map(column_map), "repair", skip_bad_records)
        return read.records(columns, source=name, where=lambda i: f"record {i}")
    kinds = (Example, Mapping)
    first = next((i for i, item in enumerate(items) if not isinstance(item, kinds)), None)
    if first is not None:
        raise TypeError(f"{name}[{first}] is a {type(items[first]).__name__}; {accepted}")
    raise TypeError(f"{name}: Example objects and records are mixed; give one kind")


# ------------------------------------------------------------------------------------------------------ files, hub


def _format_of(path: Path) -> str | None:
    suffixes = [s.lower() for s in path.suffixes[-2:]]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    return FORMATS.get(suffixes[-1]) if suffixes else None


@dataclass(frozen=True)
class _Reading:
    """How records are read into examples: the column map, the answer-offset policy, whether bad ones are skipped."""

    column_map: dict[str, str]
    on_mismatch: MismatchPolicy
    skip_bad_records: bool

    def records(
        self, columns: Mapping[str, Sequence[Any]], *, source: str, where: Callable[[int], str]
    ) -> tuple[list[Example], LoadReport]:
        return examples_from_records(
            columns,
            source=source,
            where=where,
            column_map=self.column_map,
            on_mismatch=self.on_mismatch,
            skip_bad_records=self.skip_bad_records,
        )


def _read_file(path: Path, *, read: _Reading) -> tuple[list[Example], LoadReport]:
    kind = _format_of(path)
    if path.is_dir() or kind is None:
        raise SquadFormatError(
            f"{path}: unknown data format; accepted: {', '.join(FORMATS)} files (text formats may be gzipped: "
            f".json.gz, .jsonl.gz, .csv.gz), a bundled name ({', '.join(BUNDLED)}) or a hub dataset id"
        )
    if kind == "json":
        raw = _read_json(path)
        if isinstance(raw, dict) and "data" in raw:
            return parse_squad(
                raw, source=str(path), on_mismatch=read.on_mismatch, skip_bad_records=read.skip_bad_records
            )
        if not isinstance(raw, list) or not all(isinstance(row, dict) for row in raw):
            raise SquadFormatError(
                f"{path}: expected the official SQuAD layout (an object with a 'data' list) or a list of records"
            )
        columns = {name: [row.get(name) for row in raw] for name in dict.fromkeys(k for row in raw for k in row)}
        return read.records(columns, source=str(path), where=lambda i: f"record {i}")
    columns = _read_with_datasets(path, kind)
    where = (lambda i: f"line {_record_line(path, kind, i)}") if kind in ("jsonl", "csv") else (lambda i: f"row {i}")
    return read.records(columns, source=str(path), where=where)


def _record_line(path: Path, kind: str, record: int) -> int:
    """The line on which the `record`-th record of a JSONL or CSV file starts (blank JSONL lines hold none; a quoted
    CSV cell may hold several lines)."""
    starts = _record_lines(path, kind, _stamp(path))
    return starts[record] if record < len(starts) else record + (2 if kind == "csv" else 1)


def _stamp(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_mtime_ns, stat.st_size


@functools.lru_cache(maxsize=4)
def _record_lines(path: Path, kind: str, stamp: tuple[int, int]) -> list[int]:
    """The line each record of a JSONL or CSV file starts on; read once per version of a file (`stamp`), and only
    for an error message."""
    text = _text(path)
    if kind == "jsonl":
        return [n for n, line in enumerate(text.splitlines(), start=1) if line.strip()]
    reader = csv.reader(io.StringIO(text))
    next(reader, None)  # the header
    starts, start = [], reader.line_num + 1
    for row in reader:
        if row:  # a blank line is no record (nor is it one to the reader that loads the file)
            starts.append(start)
        start = reader.line_num + 1
    return starts


def _text(path: Path) -> str:
    """The file's text; an empty file or one that is not UTF-8 is named, with the place of the first bad byte."""
    data = gzip.decompress(path.read_bytes()) if path.suffix.lower() == ".gz" else path.read_bytes()
    try:
        text = data.decode("utf-8-sig")  # a byte-order mark (what spreadsheet programs write) is not text
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
    options: dict[str, Any] = {}
    if kind == "csv":  # every cell as text, so ids keep leading zeros and empty cells stay "" (bertqa converts)
        header = next(csv.reader(io.StringIO(text)), [])
        as_text = datasets.Features({name: datasets.Value("string") for name in header})
        options = {"features": as_text, "keep_default_na": False, "encoding": "utf-8-sig"}
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
    try:
        rows = [row for _, row in _jsonl_rows(path, text)]
    except SquadFormatError as bad:
        raise bad from err
    return {name: [row.get(name) for row in rows] for name in dict.fromkeys(k for row in rows for k in row)}


def _jsonl_rows(path: Path, text: str) -> list[tuple[str, dict]]:
    """(place, record) of every non-blank line; the first line that is not a JSON object is named."""
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as bad:
            raise SquadFormatError(f"{path}: line {number} is not valid JSON (column {bad.colno}: {bad.msg})") from None
        if not isinstance(row, dict):
            raise SquadFormatError(f"{path}: line {number} is not a JSON object but {type(row).__name__}")
        rows.append((f"line {number}", row))
    return rows


def read_records(path: str | Path) -> list[tuple[str, dict]]:
    """(place, record) of each record of a small JSONL file, JSON list or single JSON object, read with `json`:
    questions to answer, say. An empty file, bytes that are not UTF-8 and lines that are not JSON are named."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"file not found: {path}")
    kind = _format_of(path)
    if kind == "json":
        raw = _read_json(path)
    else:
        text = _text(path)
        if kind == "jsonl":
            return _jsonl_rows(path, text)
        try:
            raw = json.loads(text)
        except json.JSONDecodeError:
            return _jsonl_rows(path, text)  # no telling suffix: JSON lines, then
    rows = raw if isinstance(raw, list) else [raw]
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise SquadFormatError(f"{path}: record {i} is not a JSON object but {type(row).__name__}")
    return [(f"record {i}", row) for i, row in enumerate(rows)]


@contextlib.contextmanager
def _quiet_datasets(datasets: Any) -> Iterator[None]:
    """Hide datasets' per-file progress bars and error logs while reading a local file."""
    bars = datasets.utils.logging
    was_enabled = bars.is_progress_bar_enabled()
    bars.disable_progress_bar()
    chatter = logging.getLogger("datasets")
    level = chatter.level
    chatter.setLevel(logging.CRITICAL)  # a file it cannot read is diagnosed and named by bertqa instead
    try:
        yield
    finally:
        chatter.setLevel(level)
        if was_enabled:
            bars.enable_progress_bar()


def _is_dataset(obj: Any) -> bool:
    return type(obj).__module__.startswith("datasets") and hasattr(obj, "column_names") and hasattr(obj, "to_dict")


def _load_hub(name: str, *, read: _Reading) -> tuple[list[Example], LoadReport]:
    """A hub dataset `name` or `name:split` (default split `train`); needs internet or the datasets cache."""
    import datasets

    from bertqa.hub import hub_unreachable, offline_setting

    dataset_name, _, split = name.partition(":")
    logger.info("%r is not a file or a bundled name: loading it from the Hugging Face hub", name)
    # Offline by setting, `datasets` reads its cache and fails at once; offline without it, it would retry for a
    # minute: fail now, and say how to use a cached copy.
    unreachable = hub_unreachable() if offline_setting() is None else None
    if unreachable is not None:
        raise _hub_unusable(name, unreachable)
    try:
        dataset = datasets.load_dataset(dataset_name, split=split or "train")
    except Exception as err:  # offline, unknown id, unknown split: all end here
        if (setting := offline_setting()) is not None:
            cause = f"{setting} is set and it is not in the datasets cache ({type(err).__name__})"
            raise _hub_unusable(name, cause) from err
        raise FileNotFoundError(
            f"{name!r} is neither a file, a bundled name ({', '.join(BUNDLED)}) nor a hub dataset that could be "
            f"loaded (add ':validation' for a split): {type(err).__name__}: {err}"
        ) from err
    return _from_dataset(dataset, source=name, read=read)


def _hub_unusable(name: str, reason: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"{name!r} is not a file nor a bundled name ({', '.join(BUNDLED)}), and the hub cannot be used to load it "
        f"as a dataset: {reason}. Give a local file (.json, .jsonl, .csv, .parquet), or run where the hub can be "
        "reached (a dataset loaded before is in the datasets cache: HF_HUB_OFFLINE=1 uses it)"
    )


def _from_dataset(dataset: Any, *, source: str, read: _Reading) -> tuple[list[Example], LoadReport]:
    return read.records(dataset.to_dict(), source=source, where=lambda i: f"row {i}")
