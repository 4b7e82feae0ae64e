"""Negatives: answerable questions paired with a passage that does not answer them, as unanswerable examples.

A model trained only on answerable questions always answers something, which is wrong whenever a retriever hands
it a passage without the answer. Pairing each question with other passages of its own article (hard negatives: same
topic, no answer) teaches it to say "no answer". Without titles the other passages are the ones closest to the
question by a cheap lexical measure: how many of its less common words they share.

A candidate passage is rejected when it holds any answer text of the question, compared both as raw text (case
folded) and as SQuAD-normalised words, so a negative never contains its answer. The choice is seeded per question
id: the same on every run, and for a question whatever else is loaded beside it.
"""

from __future__ import annotations

import random
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
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
    by_title: bool  # candidates came from the same article (else by lexical closeness)

    def format(self) -> str:
        where = "other passages of the same article" if self.by_title else "the lexically closest other passages"
        line = (
            f"negatives for {self.side}: {self.added:,} unanswerable examples added (up to {self.per_question} per "
            f"question, from {where}) for {self.questions:,} answerable questions; {self.rejected:,} candidate "
            f"passages rejected because they held the answer"
        )
        if self.without:
            line += (
                f"; {self.without:,} questions got no negative (no other passage"
                f"{' in their article' if self.by_title else ''} without their answer)"
            )
        return line


def holds_answer(context: str, answers: Sequence[str]) -> bool:
    """Whether `context` holds any of `answers`: as text (case folded), or as a run of SQuAD-normalised words."""
    folded = context.casefold()
    words = f" {normalize_answer(context)} "
    for answer in answers:
        if answer.strip() and answer.strip().casefold() in folded:
            return True
        norm = normalize_answer(answer)
        if norm and f" {norm} " in words:
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

    Each pairs the question with another passage of `pool` (default: the passages of `questions`): of the same
    article when the examples have titles, else among the passages closest to the question. Negatives get the id
    `<question id>-neg<k>`, the passage's title and no answer.
    """
    if isinstance(per_question, bool) or not isinstance(per_question, int) or per_question < 0:
        raise ValueError(f"negatives per question must be a whole number >= 0, got {per_question!r}")
    pool = questions if pool is None else pool
    by_title = any(ex.title for ex in pool)
    passages = _passages(pool)
    candidates = _by_article(passages) if by_title else _Lexical(passages)
    taken = {ex.id for ex in pool} | {ex.id for ex in questions}
    out, added = list(questions), 0
    rejected = without = asked = 0
    for ex in questions if per_question else ():
        if ex.is_impossible or not ex.answer_texts:
            continue
        asked += 1
        found = 0
        for title, context in candidates(ex, seed):
            if context == ex.context:
                continue
            if holds_answer(context, ex.answer_texts):
                rejected += 1
                continue
            found += 1
            qid = _fresh_id(f"{ex.id}-neg{found}", taken)
            out.append(Example(qid, title, context, ex.question, (), (), True))
            if found == per_question:
                break
        added += found
        without += found == 0
    report = NegativesReport(side, per_question, asked, added, rejected, without, by_title)
    return out, report


def _passages(pool: Sequence[Example]) -> list[tuple[str, str]]:
    """The distinct (title, context) pairs of the pool, in order of first appearance (the strings themselves, so
    negatives share them with their questions)."""
    return list(dict.fromkeys((ex.title, ex.context) for ex in pool))


def _by_article(passages: list[tuple[str, str]]) -> Callable[[Example, int], list[tuple[str, str]]]:
    articles: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for title, context in passages:
        articles[title].append((title, context))

    def candidates(ex: Example, seed: int) -> list[tuple[str, str]]:
        same = articles.get(ex.title, [])
        return random.Random(f"{seed}:{ex.id}").sample(same, len(same))

    return candidates


class _Lexical:
    """Candidate passages of a question, closest first: most shared words among those in at most `max_share` of
    the passages (common words say nothing about closeness), ties in a seeded order."""

    def __init__(self, passages: list[tuple[str, str]], max_share: float = 0.05, min_cap: int = 50) -> None:
        self.passages = passages
        postings: dict[str, list[int]] = defaultdict(list)
        for i, (_, context) in enumerate(passages):
            for word in set(_WORD.findall(context.lower())):
                postings[word].append(i)
        cap = max(min_cap, int(max_share * len(passages)))
        self.postings = {w: p for w, p in postings.items() if len(p) <= cap}

    def __call__(self, ex: Example, seed: int) -> list[tuple[str, str]]:
        shared: Counter[int] = Counter()
        for word in set(_WORD.findall(ex.question.lower())):
            shared.update(self.postings.get(word, ()))
        rng = random.Random(f"{seed}:{ex.id}")
        ranked = sorted(shared, key=lambda i: (-shared[i], rng.random()))
        return [self.passages[i] for i in ranked]


def _fresh_id(qid: str, taken: set[str]) -> str:
    while qid in taken:  # a user's data may already hold such an id
        qid += "'"
    taken.add(qid)
    return qid
