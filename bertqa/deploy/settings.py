"""What a model answers with: the settings saved beside it (`bertqa.json`), or, for a model bertqa did not train (a
folder saved by plain transformers, a hub id), windows that fit it; and the SQuAD version and no-answer threshold
asked for.

A third-party model cannot say whether it was trained on SQuAD 2.0: nothing in its config records it, and a model
trained on SQuAD 1.1 asked for "no answer" gives one wherever its null score happens to win. So it answers as SQuAD
1.1 (always a span) unless the caller says otherwise (`v2=True`, or a threshold), and one log line states the
windows and the version it answers with, so that nothing about it is a silent default.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from bertqa.data import Window
from bertqa.deploy.backends import saved_settings, with_defaults

__all__ = ["answer_settings", "answer_version", "answers_v2", "default_window", "readable_length"]

logger = logging.getLogger("bertqa")

# A tokenizer that states no limit has transformers' stand-in for infinity (1e30) as its model_max_length.
NO_LIMIT = 1_000_000
# Families whose position ids start after the padding index, as RoBERTa's do: a table of 514 reads 512 tokens.
PADDING_OFFSET_TYPES = frozenset(
    {
        "camembert",
        "data2vec-text",
        "ibert",
        "longformer",
        "luke",
        "mpnet",
        "roberta",
        "roberta-prelayernorm",
        "xlm-roberta",
        "xlm-roberta-xl",
        "xmod",
    }
)


def readable_length(tokenizer: Any, config: Any) -> int | None:
    """The longest window a model reads: the smaller of its tokenizer's `model_max_length` (where it states one)
    and its config's position table (less the padding offset of RoBERTa's family); None where neither says."""
    limits = []
    stated = getattr(tokenizer, "model_max_length", None)
    if isinstance(stated, int) and 0 < stated < NO_LIMIT:
        limits.append(stated)
    positions = getattr(config, "max_position_embeddings", None)
    if isinstance(positions, int) and positions > 0:
        if getattr(config, "model_type", None) in PADDING_OFFSET_TYPES:
            positions -= (getattr(config, "pad_token_id", None) or 0) + 1
        limits.append(positions)
    return min(limits) if limits else None


def default_window(tokenizer: Any, config: Any) -> Window:
    """Windows for a model bertqa did not train: bertqa's defaults (384 tokens, 128 shared, questions cut to 64)
    where the model reads that far, else its longest window with the stride and question length in the same
    proportions. Refused where that leaves no room for the context."""
    longest, default = readable_length(tokenizer, config), Window()
    if longest is None or longest >= default.max_seq_length:
        return default
    window = Window(
        max_seq_length=longest,
        doc_stride=longest * default.doc_stride // default.max_seq_length,
        max_query_length=longest * default.max_query_length // default.max_seq_length,
    )
    try:
        window.context_room(tokenizer.num_special_tokens_to_add(pair=True))
    except ValueError as err:
        raise ValueError(
            f"the model reads at most {longest} tokens, too few for question-answering windows: {err}"
        ) from None
    return window


def answers_v2(saved_v2: bool, *, v2: bool | None, threshold: float | None) -> bool:
    """Whether a model answers as SQuAD 2.0: as asked (`v2`, or a threshold, which makes "no answer" possible),
    else as saved (`saved_v2`; a model without `bertqa.json`: no)."""
    return v2 is not False if v2 is not None or threshold is not None else saved_v2


def answer_version(settings: dict[str, Any], *, v2: bool | None, threshold: float | None) -> tuple[dict[str, Any], str]:
    """`settings` with the SQuAD version and threshold to answer with, and how it answers, in words.

    Unasked, a model answers as saved (a model without `bertqa.json`: as SQuAD 1.1). `v2=True` turns "no answer"
    on, at the saved threshold of a v2 model, else at `DEFAULT_NO_ANSWER_THRESHOLD`; a `threshold` turns it on at
    that threshold (a threshold is never ignored); `v2=False` turns it off, and refuses a threshold beside it."""
    from bertqa.sources import DEFAULT_NO_ANSWER_THRESHOLD

    if v2 is False and threshold is not None:
        raise ValueError(
            f"a no-answer threshold ({threshold:g}) makes 'no answer' possible, which v2=False (--v2 false) rules "
            "out: give one or the other"
        )
    saved_v2, saved = bool(settings["v2"]), settings["no_answer_threshold"]
    asked = v2 is not None or threshold is not None
    answer_v2 = answers_v2(saved_v2, v2=v2, threshold=threshold)
    if not answer_v2:
        said = "as a SQuAD 1.1 model: always a span, never 'no answer' (--v2 or --threshold for SQuAD 2.0)"
        return {**settings, "v2": False, "no_answer_threshold": None}, said
    given = threshold is not None
    if not given:
        threshold = saved if saved_v2 else None
        threshold = DEFAULT_NO_ANSWER_THRESHOLD if threshold is None and asked else threshold
    source = "as given" if given else "saved with it" if saved_v2 and saved is not None else "the default"
    rule = f"'no answer' when its null score beats its best span's by more than {threshold:g} ({source})"
    said = f"as a SQuAD 2.0 model{' as asked' if asked else ''}: " + (
        "no threshold, never 'no answer'" if threshold is None else rule
    )
    return {**settings, "v2": answer_v2, "no_answer_threshold": threshold}, said


def answer_settings(
    model_dir: str | Path, tokenizer: Any, *, v2: bool | None = None, threshold: float | None = None
) -> tuple[dict[str, Any], bool]:
    """The settings to answer `model_dir` with, and whether they come from its `bertqa.json`.

    A model without one gets windows that fit it (`default_window`) and answers as SQuAD 1.1 unless `v2` or a
    `threshold` says otherwise (`answer_version`); one INFO line says all of it. A bertqa model answers as saved;
    a version or threshold asked of it is said too, as a warning where it was trained on SQuAD 1.1 (its no-answer
    score was never trained)."""
    saved = saved_settings(model_dir)
    settings, said = answer_version(with_defaults(saved), v2=v2, threshold=threshold)
    if saved is None:
        window = default_window(tokenizer, _config(model_dir))
        settings.update(window.to_dict())
        logger.info(
            "%s has no bertqa.json (a model bertqa did not train): answering with max_seq_length %d%s, doc_stride "
            "%d, max_query_length %d, max_answer_length %d, %s",
            *(model_dir, window.max_seq_length, "" if window == Window() else " (the most the model reads)"),
            *(window.doc_stride, window.max_query_length, settings["max_answer_length"], said),
        )
    elif v2 is not None or threshold is not None:
        trained_v1 = not saved.get("v2") and settings["v2"]
        logger.log(
            logging.WARNING if trained_v1 else logging.INFO,
            "%s%s answers %s",
            model_dir,
            " was trained on SQuAD 1.1, so its no-answer score was never trained; it" if trained_v1 else "",
            said,
        )
    return settings, saved is not None


def _config(model_dir: str | Path) -> Any:
    from transformers import AutoConfig

    from bertqa.model import load_pretrained

    return load_pretrained("model config", AutoConfig.from_pretrained, str(model_dir))
