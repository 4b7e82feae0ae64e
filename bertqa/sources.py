"""Which examples a run trains, evaluates and calibrates on, read top to bottom in `run_examples`.

A source (a bundled name, a file, a hub id, optionally with an article range) is loaded and validated
(`bertqa.loading`, `bertqa.examples`); the evaluation data is the one named, or a held-out share of the training
data; a SQuAD v2 run holds out more training questions to choose its no-answer threshold on; then seeded subsets.
Every split keeps whole articles on one side, so no passage is both trained on and scored.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bertqa.examples import Example, LoadReport, is_v2
from bertqa.loading import as_examples, load_squad
from bertqa.negatives import NegativesReport, add_negatives

logger = logging.getLogger("bertqa")

__all__ = [
    "RunExamples",
    "answerable_only",
    "eval_source",
    "hold_out",
    "load_examples",
    "run_examples",
    "select_articles",
    "source_parts",
    "split_article_range",
    "subsample",
]


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
    return "dev-v1.1" if train_data == "train-v1.1" else 0.1


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
    negatives: int = 0,
    train_examples: Sequence[Example] | Any | None = None,
    eval_examples: Sequence[Example] | Any | None = None,
) -> RunExamples:
    """The examples a run trains, evaluates and calibrates on.

    Examples passed in (a list of `Example`s or a `datasets.Dataset` of records) replace what `train_data` or the
    evaluation source would load, and are used whole; `max_*_examples` draw seeded subsets of loaded data only.
    With `negatives` R > 0 the run is a SQuAD v2 run: each answerable question of the training side, of the
    threshold's held-out questions and of a held-out evaluation share gets up to R unanswerable partners from other
    passages of its side (`bertqa.negatives`); named evaluation data is scored as it is. `max_*_examples` count
    the questions drawn before negatives are added.
    """
    options = {"answerable": answerable, "seed": seed, "column_map": column_map}
    reports: list[LoadReport | NegativesReport] = []
    if train_examples is None:
        train, report = load_examples(train_data, **options)
        reports.append(report)
    else:
        train = as_examples(train_examples, column_map=column_map)
    source = eval_source(train_data, eval_data, eval_split)
    named = None
    if eval_examples is not None:
        evaluation, described = as_examples(eval_examples, column_map=column_map), "given examples"
    elif isinstance(source, float):
        train, evaluation = hold_out(train, source, seed=seed)
        described = f"{source:.0%} of the training data held out ({len(evaluation):,} questions)"
    else:
        evaluation, report = load_examples(source, **options)
        reports.append(report)
        described, named = str(source), _findable(source)
    calibration: list[Example] = []
    pools = {"train": train, "eval": evaluation, "calibration": calibration}  # each side before subsets
    if is_v2(train) or negatives:  # a v2 model: its no-answer threshold is chosen on questions of its own
        train, pools["calibration"] = hold_out(train, calibration_split, seed=seed + 1, purpose="calibration")
        pools["train"] = train
        calibration = subsample(pools["calibration"], max_eval_examples, seed=seed)
    if train_examples is None:
        train = subsample(train, max_train_examples, seed=seed)
    if eval_examples is None:
        evaluation = subsample(evaluation, max_eval_examples, seed=seed)
    sides = {"train": train, "calibration": calibration, "eval": evaluation}
    if negatives:  # a held-out evaluation share is of the same data: it is scored on saying "no answer" too
        held_out_eval = isinstance(source, float) and eval_examples is None
        reports += _add_negatives(sides, pools, negatives, seed=seed, eval_too=held_out_eval)
    return RunExamples(sides["train"], sides["eval"], sides["calibration"], calibration_split, tuple(reports),
                       described, named)  # fmt: skip


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
            why = (f"every other passage held the answer of each of its {report.questions:,} answerable questions"
                   if report.questions else "it has no answerable question")  # fmt: skip
            raise ValueError(f"negatives={negatives} added no unanswerable example to the training data ({why}): "
                             "there is nothing to learn 'no answer' from")  # fmt: skip
        reports.append(report)
    return reports


def _findable(source: str) -> str:
    """A file source by its absolute path ("dev.json[3:]" keeps its range); bundled names and hub ids as they are."""
    if len(parts := source_parts(source)) > 1:
        return "+".join(map(_findable, parts))
    file = str(split_article_range(source)[0])
    return str(Path(file).resolve()) + source[len(file) :] if Path(file).exists() else source


def load_examples(
    source: str | Path | Any,
    *,
    answerable: bool = False,
    max_examples: int | None = None,
    seed: int = 0,
    column_map: str | Mapping[str, str] | None = None,
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
            loaded = [load_examples(part, answerable=answerable, column_map=column_map) for part in parts]
        except FileNotFoundError as err:
            raise FileNotFoundError(f"{err} ('+' joins sources: {source!r} was read as {len(parts)}: "
                                    f"{', '.join(map(repr, parts))})") from err  # fmt: skip
        examples = _joined([exs for exs, _ in loaded], parts)
        return subsample(examples, max_examples, seed=seed), _joined_report([r for _, r in loaded], str(source))
    named, (source, articles) = source, split_article_range(source)
    examples, report = load_squad(source, column_map=column_map)
    if articles is not None:  # the report counts the articles kept
        examples = select_articles(examples, articles)
        report = dataclasses.replace(
            report,
            source=f"{report.source}{str(named)[len(str(source)) :]}",
            n_examples=len(examples),
            n_impossible=sum(ex.is_impossible for ex in examples),
            n_answers=sum(len(ex.answer_texts) for ex in examples),
        )
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
                raise ValueError(f"question id {ex.id!r} is in both {parts[seen[ex.id]]} and {parts[k]}: joined "
                                 "sources must not share questions")  # fmt: skip
    return [ex for examples in sides for ex in examples]


def _joined_report(reports: list[LoadReport], source: str) -> LoadReport:
    counts = {
        name: sum(getattr(r, name) for r in reports)
        for name in ("n_examples", "n_impossible", "n_answers", "n_repaired", "n_located", "n_generated_ids")
    }
    version = "v2.0" if counts["n_impossible"] else "v1.1"
    return LoadReport(source=source, version=version, **counts)


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


def hold_out(
    examples: Sequence[Example], share: float, *, seed: int, purpose: str = "evaluation"
) -> tuple[list[Example], list[Example]]:
    """Split off a seeded `share` of the examples for `purpose`: (kept, held out), each in the original order.

    Whole articles go to one side (an article is a title; an example without a title is its passage's own article),
    so no passage is both trained on and evaluated on. The held-out side is the first articles of a seeded shuffle
    that reach the share; when whole articles make it much larger than asked, that is said.
    """
    if not 0 < share < 1:
        raise ValueError(f"the held-out share must be between 0 and 1, got {share}")
    if not examples:
        raise ValueError(f"cannot hold out {purpose} data: there are no examples")
    articles = [_article(ex) for ex in examples]
    sizes = Counter(articles)  # in order of first appearance
    groups = list(sizes)
    if len(groups) < 2:
        advice = {
            "evaluation": "pass evaluation data instead",
            "calibration": "a SQuAD v2 run (unanswerable questions, or --negatives) chooses its no-answer threshold "
            "on held-out training articles, so its training data needs at least two",
        }.get(purpose, "")
        raise ValueError(
            f"cannot hold out {purpose} data: all {len(examples)} examples are of one article (one title, or one "
            "passage where there is no title)" + (f"; {advice}" if advice else "")
        )
    held: set[tuple[str, str]] = set()
    sum_held = 0
    order = random.Random(seed).sample(groups, len(groups))
    for group in order[:-1]:  # at least one article stays for training
        if sum_held >= share * len(examples):
            break
        held.add(group)
        sum_held += sizes[group]
    if sum_held > max(2 * share, share + 0.05) * len(examples):
        logger.warning(
            "the %s share holds %d of %d examples (%.0f%%, %.0f%% asked): whole articles (%d in all) go to one side",
            *(purpose, sum_held, len(examples), 100 * sum_held / len(examples), 100 * share, len(groups)),
        )
    kept = [ex for ex, article in zip(examples, articles) if article not in held]
    return kept, [ex for ex, article in zip(examples, articles) if article in held]


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
