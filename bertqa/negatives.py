"""Negatives: answerable questions paired with a passage that does not answer them, as unanswerable examples.

A model trained only on answerable questions always answers something, which is wrong whenever a retriever hands
it a passage without the answer. Pairing each question with other passages of its own article (hard negatives: same
topic, no answer) teaches it to say "no answer". Without a title, or when its article has no other passage to
offer, the passages closest to the question by a cheap lexical measure come next (how many of its less common words
they share), and then any other passage, so a question goes without only when every passage holds its answer.

A candidate passage is rejected when it holds any answer text of the question, compared both as raw text (case
folded) and as SQuAD-normalised words, so a negative never contains its answer. The choice is seeded per question
id: the same on every run, and for a question whatever else is loaded beside it.
"""

from __future__ import annotations

import numbers
import random
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from bertqa.examples import Example
from bertqa.metrics import normalize_answer

__all__ = ["NegativesReport", "add_negatives", "holds_answer"]

_WORD = re.compile(r"\w+")


@dataclass(frozen=True)
class NegativesReport:
    """What `add_negatives` did to one side of a run (training, calibration, a held-out evaluation share)."""

    side: str
    per_question: int
    questions: int  # answerable questions that were offered negatives
    added: int
    rejected: int  # candidate passages refused because they held an answer of the question
    without: int  # questions that got no negative at all
    # How many negatives came from each kind of candidate: "same article", "lexically closest", "other".
    by_kind: tuple[tuple[str, int], ...] = ()

    def format(self) -> str:
        kinds = ", ".join(f"{n:,} from {_KIND_WORDS[kind]}" for kind, n in self.by_kind if n)
        line = (
            f"negatives for {self.side}: {self.added:,} unanswerable examples added for {self.questions:,} answerable "
            f"questions (up to {self.per_question} each{': ' + kinds if kinds else ''}); {self.rejected:,} candidate "
            f"passages rejected because they held the answer"
        )
        if self.without:
            line += f"; {self.without:,} questions got no negative (every other passage held their answer)"
        return line


_KIND_WORDS = {
    "same article": "another passage of the same article",
    "lexically closest": "the lexically closest passages",
    "other": "other passages (seeded order)",
}


def holds_answer(context: str, answers: Sequence[str]) -> bool:
    """Whether `context` holds any of `answers`: as text (case folded), as a run of words (any punctuation between
    them: "Denver Broncos" is held by "the denver-broncos"), or as a run of SQuAD-normalised words."""
    folded = context.casefold()
    words = f" {' '.join(_WORD.findall(folded))} "
    normalised = f" {normalize_answer(context)} "
    for answer in answers:
        if answer.strip() and answer.strip().casefold() in folded:
            return True
        as_words = " ".join(_WORD.findall(answer.casefold()))
        if as_words and f" {as_words} " in words:
            return True
        norm = normalize_answer(answer)
        if norm and f" {norm} " in normalised:
            return True
    return False


def add_negatives(
    questions: Sequence[Example],
    per_question: int,
    *,
    seed: int,
    pool: Sequence[Example] | None = None,
    side: str = "training",
) -> tuple[list[Example], NegativesReport]:
    """`questions` followed by up to `per_question` unanswerable examples for each answerable one.

    Each pairs the question with another passage of `pool` (default: the passages of `questions`): first those of
    its own article (when it has a title), in a seeded order; then the passages closest to the question by shared
    less common words; then any other, in a seeded order. Negatives get the id `<question id>-neg<k>`, the
    passage's title and no answer.
    """
    if isinstance(per_question, bool) or not isinstance(per_question, numbers.Integral) or per_question < 0:
        raise ValueError(f"negatives per question must be a whole number >= 0, got {per_question!r}")
    per_question = int(per_question)
    pool = questions if pool is None else pool
    candidates = _Candidates(_passages(pool))
    taken = {ex.id for ex in pool} | {ex.id for ex in questions}
    out = list(questions)
    kinds: Counter[str] = Counter()
    rejected = without = asked = 0
    for ex in questions if per_question else ():
        if ex.is_impossible or not ex.answer_texts:
            continue
        asked += 1
        found = 0
        for kind, (title, context) in candidates(ex, seed):
            if holds_answer(context, ex.answer_texts):
                rejected += 1
                continue
            found += 1
            kinds[kind] += 1
            out.append(Example(_fresh_id(f"{ex.id}-neg{found}", taken), title, context, ex.question, (), (), True))
            if found == per_question:
                break
        without += found == 0
    by_kind = tuple((kind, kinds[kind]) for kind in _KIND_WORDS)
    return out, NegativesReport(side, per_question, asked, sum(kinds.values()), rejected, without, by_kind)


def _passages(pool: Sequence[Example]) -> list[tuple[str, str]]:
    """The distinct (title, context) pairs of the pool, in order of first appearance (the strings themselves, so
    negatives share them with their questions)."""
    return list(dict.fromkeys((ex.title, ex.context) for ex in pool))


class _Candidates:
    """The other passages for a question, best first, as (kind, passage), computed lazily: most questions need one.

    Passages of its own article come first; then those sharing most of its words that are in at most `max_share` of
    the passages (common words say nothing about closeness); then the rest. Ties and orders are seeded by the
    question id, never by Python's per-process string hashing.
    """

    def __init__(self, passages: list[tuple[str, str]], max_share: float = 0.05, min_cap: int = 50) -> None:
        self.passages = passages
        self.articles: dict[str, list[int]] = defaultdict(list)
        self.holding: dict[str, list[int]] = defaultdict(list)  # context -> its passages (under any title)
        postings: dict[str, list[int]] = defaultdict(list)
        for i, (title, context) in enumerate(passages):
            self.holding[context].append(i)
            if title:
                self.articles[title].append(i)
            for word in sorted(set(_WORD.findall(context.lower()))):
                postings[word].append(i)
        cap = max(min_cap, int(max_share * len(passages)))
        self.postings = {w: p for w, p in postings.items() if len(p) <= cap}

    def __call__(self, ex: Example, seed: int) -> Iterator[tuple[str, tuple[str, str]]]:
        rng = random.Random(f"{seed}:{ex.id}")
        seen = set(self.holding.get(ex.context, ()))  # its own passage is no negative
        same = self.articles.get(ex.title, []) if ex.title else []
        yield from self._fresh(rng.sample(same, len(same)), seen, "same article")  # its own passage is skipped
        shared: Counter[int] = Counter()
        for word in set(_WORD.findall(ex.question.lower())):
            shared.update(self.postings.get(word, ()))
        keys = {i: (-shared[i], rng.random()) for i in sorted(shared)}
        yield from self._fresh(sorted(keys, key=keys.__getitem__), seen, "lexically closest")
        yield from self._fresh(rng.sample(range(len(self.passages)), len(self.passages)), seen, "other")

    def _fresh(self, order: Iterable[int], seen: set[int], kind: str) -> Iterator[tuple[str, tuple[str, str]]]:
        for i in order:
            if i not in seen:
                seen.add(i)
                yield kind, self.passages[i]


def _fresh_id(qid: str, taken: set[str]) -> str:
    while qid in taken:  # a user's data may already hold such an id
        qid += "'"
    taken.add(qid)
    return qid
