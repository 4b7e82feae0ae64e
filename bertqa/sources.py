"""Which examples a run trains, evaluates and calibrates on, read top to bottom in `run_examples`.

A source (a bundled name, a file, a hub id, optionally with an article range) is loaded and validated
(`bertqa.loading`, `bertqa.examples`); the evaluation data is the one named, or a held-out share of the training
data; a SQuAD v2 run holds out more training questions to choose its no-answer threshold on; then seeded subsets.
Every split keeps whole articles on one side, so no passage is both trained on and scored.
"""

from __future__ import annotations

import contextlib
import logging
import random
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bertqa.examples import ColumnsError, Example, LoadReport, is_v2
from bertqa.loading import given_examples, load_squad
from bertqa.negatives import NegativesReport, add_negatives

logger = logging.getLogger("bertqa")

__all__ = [
    "DEFAULT_EVAL_SPLIT",
    "DEFAULT_NO_ANSWER_THRESHOLD",
    "MIN_PER_KIND",
    "HoldOutError",
    "RunExamples",
    "answerable_only",
    "eval_source",
    "findable",
    "hold_out",
    "load_examples",
    "run_examples",
    "select_articles",
    "source_parts",
    "split_article_range",
    "subsample",
    "too_few_to_calibrate",
]


# The share of a user's own training data held out for evaluation when no evaluation data is named.
DEFAULT_EVAL_SPLIT = 0.1
# A v2 run without calibration answers "no answer" when the no-answer score beats the best span's score
# (run_qa's default null-score threshold as well).
DEFAULT_NO_ANSWER_THRESHOLD = 0.0
# The fewest answerable and unanswerable questions each that a no-answer threshold is chosen on.
MIN_PER_KIND = 5


@dataclass(frozen=True)
class RunExamples:
    """The examples of one run, and what loading them found."""

    train: list[Example]
    eval: list[Example]
    # SQuAD v2: held-out training questions on which the no-answer threshold is chosen (empty for v1 data).
    calibration: list[Example]
    calibration_split: float  # the share of the training data `calibration` was held out as
    reports: tuple[LoadReport | NegativesReport, ...]  # what loading found, then what negatives added
    eval_described: str  # where the evaluation examples came from, in words
    # The evaluation data by a name that finds it again from anywhere (files by absolute path, an article range kept),
    # for `evaluate.py` to reuse; None when it cannot be named (a held-out share, examples passed in).
    eval_data: str | None
    # Why a SQuAD v2 run chose no threshold on held-out questions (it uses DEFAULT_NO_ANSWER_THRESHOLD); None when
    # it did, or when the run is not v2.
    calibration_off: str | None = None
    # An evaluation share held out of loaded training data, by the rule that draws it again: `run_examples`'s own
    # arguments (its `eval` is the same questions); None when the evaluation data is named, or was passed in.
    eval_rule: dict[str, Any] | None = None
    # The training data by a name that finds it again (as `eval_data`); None when the examples were passed in.
    train_data: str | None = None

    @property
    def v2(self) -> bool:
        """A SQuAD v2 run (a held-out share may hold no unanswerable question, so every side counts)."""
        return is_v2(self.eval) or is_v2(self.train) or is_v2(self.calibration)


def eval_source(train_data: str, eval_data: str | None, eval_split: float | None) -> str | float:
    """The evaluation data a run means: a source, or the share of the training data to hold out.

    Unset, it is the bundled dev-v1.1 for the bundled train-v1.1 (the usual SQuAD setup), and a held-out tenth of
    the training data for anything else: a user's own data is not scored against SQuAD unless asked to be.
    """
    if eval_data is not None:
        return eval_data
    if eval_split is not None:
        return eval_split
    return "dev-v1.1" if train_data == "train-v1.1" else DEFAULT_EVAL_SPLIT


def run_examples(
    train_data: str,
    *,
    eval_data: str | None = None,
    eval_split: float | None = None,
    calibration_split: float = 0.05,
    answerable: bool = False,
    max_train_examples: int | None = None,
    max_eval_examples: int | None = None,
    seed: int = 42,
    column_map: str | Mapping[str, str] | None = None,
    eval_column_map: str | Mapping[str, str] | None = None,
    skip_bad_records: bool = False,
    negatives: int = 0,
    train_examples: Sequence[Example] | Any | None = None,
    eval_examples: Sequence[Example] | Any | None = None,
) -> RunExamples:
    """The examples a run trains, evaluates and calibrates on.

    Examples passed in (`Example`s, records in the file schema, or a `datasets.Dataset`: `given_examples`) replace
    what `train_data` or the evaluation source would load, and are used whole; `max_*_examples` draw seeded subsets
    of loaded data only. Training examples passed in without evaluation data (no `eval_examples`, `eval_data` or
    `eval_split`) hold out `DEFAULT_EVAL_SPLIT` of themselves, with a warning: `train_data`'s default would name
    the bundled dev set. A SQuAD v2 run holds out `calibration_split` of its training data to choose its no-answer
    threshold on; at 0, or when nothing can be held out, it uses `DEFAULT_NO_ANSWER_THRESHOLD` (`calibration_off`).
    With `negatives` R > 0 the run is a SQuAD v2 run: each answerable question of the training side, of the
    threshold's held-out questions and of a held-out evaluation share gets up to R unanswerable partners from other
    passages of its side (`bertqa.negatives`); named evaluation data is scored as it is. `max_*_examples` count
    the questions drawn before negatives are added. `column_map` is the training data's, and the evaluation data's
    unless it has an `eval_column_map` ("standard": the usual names); `skip_bad_records` drops invalid records
    (counted, the first few named, in the load reports) instead of stopping.
    """
    arguments = {**locals(), "train_data": findable(train_data)}  # draws a held-out share again, from anywhere
    options = {"answerable": answerable, "seed": seed, "column_map": column_map, "skip_bad_records": skip_bad_records}
    train, train_report = _training_side(train_data, train_examples, options)
    alone = train_examples is not None and eval_examples is None and eval_data is None and eval_split is None
    source = _given_share() if alone else eval_source(train_data, eval_data, eval_split)
    with _evaluation_columns_named(column_map, eval_column_map):
        own = options | {"column_map": column_map if eval_column_map is None else eval_column_map}
        train, evaluation, eval_report, described, named = _evaluation_side(train, source, eval_examples, own)
    reports: list[LoadReport | NegativesReport] = [r for r in (train_report, eval_report) if r is not None]
    sides, pools, calibration_off = _draw_sides(
        train,
        evaluation,
        v2=is_v2(train) or bool(negatives),
        calibration_split=calibration_split,
        max_train=None if train_examples is not None else max_train_examples,
        max_eval=max_eval_examples,
        eval_given=eval_examples is not None,
        seed=seed,
    )
    if negatives:  # a held-out evaluation share is of the same data: it is scored on saying "no answer" too
        held_out_eval = isinstance(source, float) and eval_examples is None
        reports += _add_negatives(sides, pools, negatives, seed=seed, eval_too=held_out_eval)
    calibration_off = _drop_thin_calibration(sides) or calibration_off
    found = {"reports": tuple(reports), "eval_described": described, "eval_data": named}
    found["train_data"] = arguments["train_data"] if train_examples is None else None
    if named is None and train_examples is None and eval_examples is None:  # drawn by a rule: it can be again
        found["eval_rule"] = {k: v for k, v in arguments.items() if k not in ("train_examples", "eval_examples")}
    return RunExamples(**sides, calibration_split=calibration_split, calibration_off=calibration_off, **found)


def _training_side(
    train_data: str, train_examples: Any, options: dict[str, Any]
) -> tuple[list[Example], LoadReport | None]:
    """The training examples, loaded from `train_data` or given, and what loading found."""
    if train_examples is None:
        return load_examples(train_data, **options)
    given = {"column_map": options["column_map"], "skip_bad_records": options["skip_bad_records"]}
    return given_examples(train_examples, name="train_examples", **given)


@contextlib.contextmanager
def _evaluation_columns_named(
    column_map: str | Mapping[str, str] | None, eval_column_map: str | Mapping[str, str] | None
) -> Iterator[None]:
    """Where the evaluation data's columns do not fit, say which map it was read with and how to give another: its
    own (`eval_column_map`), or else the training data's (`column_map`)."""
    try:
        yield
    except ColumnsError as err:
        if eval_column_map is not None:
            how = f"its own column map, eval_column_map (--eval-column-map) {eval_column_map!r}"
        elif column_map:
            how = (
                f"the training data's column map ({column_map!r}) as it has none of its own: give it one with "
                "eval_column_map (--eval-column-map), 'standard' for the standard columns"
            )
        else:
            raise
        raise ColumnsError(f"{err}. The evaluation data is read with {how}") from err


def _drop_thin_calibration(sides: dict[str, list[Example]]) -> str | None:
    """Give the calibration side's questions back to training when they are too few to choose a threshold on, and
    say why (None: they are not)."""
    thin = too_few_to_calibrate(sides["calibration"]) if sides["calibration"] else None
    if thin is not None:
        sides["train"], sides["calibration"] = sides["train"] + sides["calibration"], []
        logger.warning(
            "the no-answer threshold is not calibrated (%s): they are trained on, and the default %g is used, which "
            "answers when the best span scores above 'no answer' (hold out more: --calibration-split)",
            thin,
            DEFAULT_NO_ANSWER_THRESHOLD,
        )
    return thin


def too_few_to_calibrate(calibration: Sequence[Example]) -> str | None:
    """Why `calibration` cannot choose a no-answer threshold (None: it can): a threshold chosen on fewer than
    `MIN_PER_KIND` answerable or unanswerable questions follows those few, and with no unanswerable one at all
    nothing tells it where "no answer" should start."""
    unanswerable = sum(ex.is_impossible for ex in calibration)
    answerable = len(calibration) - unanswerable
    if min(answerable, unanswerable) >= MIN_PER_KIND:
        return None
    return (
        f"its {len(calibration):,} held-out training questions hold {answerable:,} answerable and {unanswerable:,} "
        f"unanswerable ones; at least {MIN_PER_KIND} of each are needed"
    )


def _draw_sides(
    train: list[Example],
    evaluation: list[Example],
    *,
    v2: bool,
    calibration_split: float,
    max_train: int | None,
    max_eval: int | None,
    eval_given: bool,
    seed: int,
) -> tuple[dict[str, list[Example]], dict[str, list[Example]], str | None]:
    """The run's sides (train, calibration, eval) after a v2 run's threshold questions are held out of training and
    the seeded subsets drawn; the pools each side was drawn from (for negatives); why calibration is off, if it is."""
    calibration: list[Example] = []
    pools = {"train": train, "eval": evaluation, "calibration": calibration}  # each side before subsets
    calibration_off = None
    if v2:  # a v2 model: its no-answer threshold is chosen on questions of its own
        train, pools["calibration"], calibration_off = _calibration(train, calibration_split, seed=seed + 1)
        pools["train"] = train
        calibration = subsample(pools["calibration"], max_eval, seed=seed)
    train = subsample(train, max_train, seed=seed)
    if not eval_given:
        evaluation = subsample(evaluation, max_eval, seed=seed)
    return {"train": train, "calibration": calibration, "eval": evaluation}, pools, calibration_off


def _given_share() -> float:
    """The evaluation share of training examples passed in alone: not the bundled dev set that `train_data`'s
    default would name."""
    logger.warning(
        "no evaluation data was given with the training examples: %.0f%% of them is held out to evaluate on (give "
        "eval_examples, or set eval_data or eval_split)",
        100 * DEFAULT_EVAL_SPLIT,
    )
    return DEFAULT_EVAL_SPLIT


def _evaluation_side(
    train: list[Example], source: str | float, eval_examples: Any, options: dict[str, Any]
) -> tuple[list[Example], list[Example], LoadReport | None, str, str | None]:
    """(training, evaluation examples, the evaluation source's load report, how the evaluation data is described,
    and where it can be found again): the examples given, a share held out of training, or a source loaded."""
    if eval_examples is not None:
        evaluation, report = given_examples(
            eval_examples,
            column_map=options["column_map"],
            name="eval_examples",
            skip_bad_records=options["skip_bad_records"],
        )
        return train, evaluation, report, "given examples", None
    if isinstance(source, float):
        train, evaluation = hold_out(train, source, seed=options["seed"])
        share = len(evaluation) / (len(evaluation) + len(train))
        described = f"{len(evaluation):,} of the training questions held out ({share:.0%}; {source:.0%} asked)"
        return train, evaluation, None, described, None
    evaluation, report = load_examples(source, **options)
    return train, evaluation, report, str(source), findable(source)


def _calibration(train: list[Example], share: float, *, seed: int) -> tuple[list[Example], list[Example], str | None]:
    """(training, calibration) examples of a v2 run, and why there are no calibration ones (None when there are)."""
    off = "calibration_split is 0" if share == 0 else None
    if off is None:
        try:
            return (*hold_out(train, share, seed=seed, purpose="calibration"), None)
        except HoldOutError:
            off = "the training data is one passage: none can be held out"
    logger.warning(
        "the no-answer threshold is not calibrated (%s): the default %g is used", off, DEFAULT_NO_ANSWER_THRESHOLD
    )
    return train, [], off


_SIDES = {
    "train": "training",
    "calibration": "the threshold's held-out questions",
    "eval": "the held-out evaluation share",
}


def _add_negatives(
    sides: dict[str, list[Example]], pools: dict[str, list[Example]], negatives: int, *, seed: int, eval_too: bool
) -> list[NegativesReport]:
    """Add negatives to each side in place, each from its own side's passages (no passage crosses a split)."""
    reports = []
    for side in ("train", "calibration", "eval") if eval_too else ("train", "calibration"):
        sides[side], report = add_negatives(sides[side], negatives, seed=seed, pool=pools[side], side=_SIDES[side])
        if side == "train" and not report.added:
            why = (
                f"every other passage held the answer of each of its {report.questions:,} answerable questions"
                if report.questions
                else "it has no answerable question"
            )
            raise ValueError(
                f"negatives={negatives} added no unanswerable example to the training data ({why}): "
                "there is nothing to learn 'no answer' from"
            )
        reports.append(report)
    return reports


def findable(source: str) -> str:
    """A file source by its absolute path ("dev.json[3:]" keeps its range); bundled names and hub ids as they are."""
    if len(parts := source_parts(source)) > 1:
        return "+".join(map(findable, parts))
    file = str(split_article_range(source)[0])
    return str(Path(file).resolve()) + source[len(file) :] if Path(file).exists() else source


def load_examples(
    source: str | Path | Any,
    *,
    answerable: bool = False,
    max_examples: int | None = None,
    seed: int = 0,
    column_map: str | Mapping[str, str] | None = None,
    skip_bad_records: bool = False,
) -> tuple[list[Example], LoadReport]:
    """`load_squad`, then a range of articles, then optionally answerable questions only, then a seeded subset.

    `source` is anything `bertqa.loading.load_squad` reads, and may end in an article range, `dev-v2.0[:25]` or
    `dev-v2.0[25:]` (see `split_article_range`): this is how one file is split into parts that share no article.
    Several sources joined by `+` (`train-v1.1[:100]+dev-v2.0[:25]`) are read one after the other; their question
    ids must differ.
    """
    parts = source_parts(source)
    if len(parts) > 1:
        try:
            loaded = [
                load_examples(part, answerable=answerable, column_map=column_map, skip_bad_records=skip_bad_records)
                for part in parts
            ]
        except FileNotFoundError as err:
            raise FileNotFoundError(
                f"{err} ('+' joins sources: {source!r} was read as {len(parts)}: {', '.join(map(repr, parts))})"
            ) from err
        examples = _joined([exs for exs, _ in loaded], parts)
        return subsample(examples, max_examples, seed=seed), _joined_report([r for _, r in loaded], str(source))
    named, (source, articles) = source, split_article_range(source)
    examples, report = load_squad(source, column_map=column_map, skip_bad_records=skip_bad_records)
    if articles is not None:  # the report is of the articles kept
        examples = select_articles(examples, articles)
        report = report.part(examples, f"{report.source}{str(named)[len(str(source)) :]}")
    if answerable:
        examples = answerable_only(examples)
    return subsample(examples, max_examples, seed=seed), report


def source_parts(source: str | Path | Any) -> list[Any]:
    """The sources joined by `+` in `source` (itself alone when it is not a string, or names an existing file)."""
    if not isinstance(source, str) or "+" not in source or Path(split_article_range(source)[0]).exists():
        return [source]
    parts = [part.strip() for part in source.split("+")]
    if not all(parts):
        raise ValueError(f"data source {source!r}: an empty source around '+'")
    return parts


def _joined(sides: list[list[Example]], parts: list[str]) -> list[Example]:
    seen: dict[str, int] = {}
    for k, examples in enumerate(sides):
        for ex in examples:
            if seen.setdefault(ex.id, k) != k:
                raise ValueError(
                    f"question id {ex.id!r} is in both {parts[seen[ex.id]]} and {parts[k]}: joined "
                    "sources must not share questions"
                )
    return [ex for examples in sides for ex in examples]


def _joined_report(reports: list[LoadReport], source: str) -> LoadReport:
    counts = {
        name: sum(getattr(r, name) for r in reports)
        for name in (
            "n_examples",
            "n_impossible",
            "n_answers",
            "n_repaired",
            "n_located",
            "n_generated_ids",
            "n_skipped",
        )
    }
    ids = {
        name: tuple(qid for r in reports for qid in getattr(r, name))
        for name in ("repaired_ids", "located_ids", "ambiguous_ids")
    }
    ids["generated_ids"] = frozenset().union(*(r.generated_ids for r in reports))
    version = "v2.0" if counts["n_impossible"] else "v1.1"
    notes = tuple(note for r in reports for note in r.notes)
    return LoadReport(source=source, version=version, **counts, **ids, notes=notes)


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


class HoldOutError(ValueError):
    """Nothing can be held out without a passage on both sides: the examples are of one passage."""


def hold_out(
    examples: Sequence[Example], share: float, *, seed: int, purpose: str = "evaluation"
) -> tuple[list[Example], list[Example]]:
    """Split off a seeded `share` of the examples for `purpose`: (kept, held out), each in the original order.

    Whole articles go to one side (an article is a title; an example without a title is its passage's own article),
    so no passage is both trained on and evaluated on. The held-out side is the articles of a seeded shuffle taken in
    turn until they reach the share, passing over any that would take it far past it (more than twice the share,
    or 5 points over). Small data falls back to whole passages, said in the log: when there is one article only, or
    every article alone is too big. The same article may then be on both sides, never the same passage. When even
    one passage is too big, the smallest is held out (said); examples of one passage cannot be split: `HoldOutError`.
    """
    if not 0 < share < 1:
        raise ValueError(f"the held-out share must be between 0 and 1, got {share}")
    if not examples:
        raise ValueError(f"cannot hold out {purpose} data: there are no examples")
    articles = [_article(ex) for ex in examples]
    held = _held_units(articles, share, seed=seed)
    if held:
        return _split(examples, held, articles)
    passages = [ex.context for ex in examples]
    held = _held_units(passages, share, seed=seed)
    if held is None:
        advice = {
            "evaluation": "name evaluation data instead (--eval-data; eval_examples or eval_data for fit)",
            "calibration": "a SQuAD v2 run chooses its no-answer threshold on held-out training passages",
        }.get(purpose, "")
        raise HoldOutError(
            f"cannot hold out {purpose} data: all {len(examples)} examples are of one passage, and no passage may be "
            "on both sides" + (f"; {advice}" if advice else "")
        )
    n_articles = len(set(articles))
    why = "one article" if n_articles == 1 else f"each of its {n_articles} articles alone is far more than the share"
    logger.warning(
        "the %s share is held out by passage, not by article (%s): no passage is on both sides, but an article may be",
        purpose,
        why,
    )
    if not held:  # every passage alone is too big as well: the smallest, rather than none
        sizes = Counter(passages)
        held = {min(random.Random(seed).sample(list(sizes), len(sizes)), key=sizes.__getitem__)}
        logger.warning(
            "the %s share holds %d of %d examples (%.0f%%, %.0f%% asked): the smallest passage, since no passage "
            "can be on both sides",
            purpose,
            sizes[next(iter(held))],
            len(examples),
            100 * sizes[next(iter(held))] / len(examples),
            100 * share,
        )
    return _split(examples, held, passages)


def _held_units(units: Sequence[Any], share: float, *, seed: int) -> set[Any] | None:
    """The units (articles or passages) to hold out: a seeded shuffle of them, taken in turn until they reach
    `share` of the examples, passing over a unit that would take the held-out part far past it; at least one unit
    stays. Empty when every unit alone is too big; None when there is one unit only."""
    sizes = Counter(units)  # in order of first appearance
    if len(sizes) < 2:
        return None
    target, limit = share * len(units), max(2 * share, share + 0.05) * len(units)
    held: set[Any] = set()
    total = 0
    for unit in random.Random(seed).sample(list(sizes), len(sizes)):
        if total >= target or len(held) == len(sizes) - 1:
            break
        if total + sizes[unit] <= limit:
            held.add(unit)
            total += sizes[unit]
    return held


def _split(examples: Sequence[Example], held: set[Any], units: Sequence[Any]) -> tuple[list[Example], list[Example]]:
    kept = [ex for ex, unit in zip(examples, units) if unit not in held]
    return kept, [ex for ex, unit in zip(examples, units) if unit in held]


def _article(ex: Example) -> tuple[str, str]:
    return ("title", ex.title) if ex.title else ("passage", ex.context)


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
