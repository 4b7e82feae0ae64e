"""Tiny question-answering models of three tokenizer families, built offline, and passages that trip offsets.

Each model is saved by plain transformers `save_pretrained` (no `bertqa.json`), as a model from the hub would be:

- `bert`: WordPiece, MiniLM's real vocabulary (`[CLS] q [SEP] c [SEP]`, with segment ids).
- `roberta`: byte-level BPE trained here on `CORPUS` (`<s> q </s></s> c </s>`, no segment ids). Its offsets are
  per byte: a character split over several tokens gives each of them the whole character (overlapping spans), and a
  lone space token gets an empty span.
- `deberta-v2`: SentencePiece-style Unigram with the Metaspace pre-tokenizer (`[CLS] q [SEP] c [SEP]`). Its offsets
  include the space a `▁` stands for, a lone `▁` at the start of the context gets the first character (the same as
  the token after it), and its NFC normaliser leaves a decomposed accent out of every token.

The passages (`PASSAGES`) hold accents both composed and decomposed, CJK without spaces, emoji with zero-width
joiners and skin tones, runs of spaces, tabs and newlines, non-breaking spaces, leading and trailing whitespace,
punctuation glued to words, numbers with commas, and answers at the very start and end of a context. The corpus the
tokenizers learn from holds all but the last passage, whose characters are unknown to the SentencePiece vocabulary.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bertqa.data import Example

FAMILIES = ("bert", "roberta", "deberta-v2")

# Small enough to build in well under a second each; 2 layers and 32 wide as the repository's tiny BERT.
SHAPE = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}


@dataclass(frozen=True)
class Passage:
    """A context, a question about it, and the answers (each found at its first occurrence) on its tricky spots."""

    context: str
    question: str
    answers: tuple[str, ...]


PASSAGES = (
    Passage("Le café est à Paris. Le cafe\u0301 de Lyon ferme tôt.", "Quel café?", ("café", "cafe\u0301", "Le", "tôt")),
    Passage("東京は日本の首都です。大阪は商業の中心です。", "首都は?", ("東京", "日本の首都", "大阪", "中心です。")),
    Passage(
        "We love 👩\u200d👩\u200d👧\u200d👦 families and 👍🏽 thumbs. The 🎉 party starts at noon.",
        "Which emoji?",
        ("👩\u200d👩\u200d👧\u200d👦", "👍🏽", "🎉 party", "noon."),
    ),
    Passage(
        "Alpha   beta\tgamma\n\ndelta  \t epsilon",
        "Which letter?",
        ("Alpha", "beta\tgamma", "gamma\n\ndelta", "epsilon"),
    ),
    Passage("Price:\u00a0100\u00a0dollars today", "How much?", ("100\u00a0dollars", "100", "today")),
    Passage(
        "   Zanzibar is an island; its capital is Stone Town.   ",
        "What is the capital?",
        ("Zanzibar", "Stone Town", "Stone Town."),
    ),
    Passage(
        '(Hello),world!"quoted"...end;semi-colon', "Which word?", ("(Hello),world", "Hello", "quoted", "semi-colon")
    ),
    Passage("The city has 1,234,567 people and 3,000 cars.", "How many people?", ("1,234,567", "3,000", "The city")),
    Passage("\n\tNew York\u00a0City is big\n", "Which city?", ("New York\u00a0City", "big")),
    Passage("The snowman ☃ met Ωmega at ꙮ dawn", "Who met whom?", ("☃", "Ωmega", "ꙮ dawn", "The snowman")),
)

# What the tokenizers are trained on: every passage but the last (its characters stay unknown), and the questions.
CORPUS = (
    [p.context for p in PASSAGES[:-1]] * 4
    + [p.question for p in PASSAGES] * 2
    + [
        "the quick brown fox jumps over the lazy dog while the city sleeps",
        "who wrote the book and where was it published in which year",
    ]
)


def passage_examples(passages: tuple[Passage, ...] = PASSAGES) -> list[Example]:
    """One answerable example per (passage, answer), ids `p<passage>a<answer>`."""
    examples = []
    for i, p in enumerate(passages):
        for j, answer in enumerate(p.answers):
            start = p.context.index(answer)
            examples.append(Example(f"p{i}a{j}", "tricky", p.context, p.question, (answer,), (start,), False))
    return examples


def squad_file(path: Path, passages: tuple[Passage, ...] = PASSAGES) -> Path:
    """The passages as a SQuAD v1.1 file, one article, one question per answer."""
    paragraphs = [
        {
            "context": p.context,
            "qas": [
                {
                    "id": f"p{i}a{j}",
                    "question": p.question,
                    "answers": [{"text": a, "answer_start": p.context.index(a)}],
                }
                for j, a in enumerate(p.answers)
            ],
        }
        for i, p in enumerate(passages)
    ]
    path.write_text(json.dumps({"version": "1.1", "data": [{"title": "tricky", "paragraphs": paragraphs}]}))
    return path


# ------------------------------------------------------------------------------------------------------ tokenizers


def bert_tokenizer() -> Any:
    from bertqa.model import build_tokenizer

    return build_tokenizer("minilm-l6")


def roberta_tokenizer() -> Any:
    """Byte-level BPE as RoBERTa's: specials at RoBERTa's ids, pairs built by `RobertaProcessing`."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import RobertaTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=350,
        special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(CORPUS, trainer)
    learnt = json.loads(bpe.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in learnt["merges"]]
    return RobertaTokenizerFast(vocab=learnt["vocab"], merges=merges)


def deberta_tokenizer() -> Any:
    """A Unigram vocabulary as DeBERTa-v3's (specials at its ids), in `DebertaV2TokenizerFast`, which adds the
    Metaspace pre-tokenizer and its whitespace-folding, NFC normaliser."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import DebertaV2TokenizerFast

    unigram = Tokenizer(models.Unigram())
    unigram.normalizer = normalizers.Sequence([normalizers.Replace(Regex(r"\s{2,}|[\n\r\t]"), " "), normalizers.NFC()])
    unigram.pre_tokenizer = pre_tokenizers.Metaspace()
    trainer = trainers.UnigramTrainer(
        vocab_size=400,
        special_tokens=["[PAD]", "[CLS]", "[SEP]", "[UNK]", "[MASK]"],
        unk_token="[UNK]",
        show_progress=False,
    )
    unigram.train_from_iterator(CORPUS, trainer)
    learnt = json.loads(unigram.to_str())["model"]
    # The trainer's scores vary in the third decimal from run to run: rounded and sorted, every build is the same.
    specials, pieces = learnt["vocab"][:5], learnt["vocab"][5:]
    pieces = sorted(((piece, round(score, 2)) for piece, score in pieces), key=lambda v: (-v[1], v[0]))
    return DebertaV2TokenizerFast(vocab=[tuple(v) for v in specials + pieces], unk_id=learnt["unk_id"])


# ----------------------------------------------------------------------------------------------------------- models


def bert_model(tokenizer: Any) -> torch.nn.Module:
    from transformers import BertConfig, BertForQuestionAnswering

    return BertForQuestionAnswering(BertConfig(vocab_size=len(tokenizer), **SHAPE))


def roberta_model(tokenizer: Any) -> torch.nn.Module:
    from transformers import RobertaConfig, RobertaForQuestionAnswering

    config = RobertaConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=514,  # RoBERTa's positions start after the padding index
        type_vocab_size=1,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.cls_token_id,
        eos_token_id=tokenizer.sep_token_id,
        **SHAPE,
    )
    return RobertaForQuestionAnswering(config)


def deberta_model(tokenizer: Any) -> torch.nn.Module:
    """DeBERTa-v3's layout: relative attention with log buckets, no absolute positions, no segment embeddings."""
    from transformers import DebertaV2Config, DebertaV2ForQuestionAnswering

    config = DebertaV2Config(
        vocab_size=len(tokenizer),
        max_position_embeddings=512,
        type_vocab_size=0,
        relative_attention=True,
        position_buckets=256,
        pos_att_type=["p2c", "c2p"],
        norm_rel_ebd="layer_norm",
        share_att_key=True,
        position_biased_input=False,
        pad_token_id=tokenizer.pad_token_id,
        **SHAPE,
    )
    return DebertaV2ForQuestionAnswering(config)


BUILDERS = {
    "bert": (bert_tokenizer, bert_model),
    "roberta": (roberta_tokenizer, roberta_model),
    "deberta-v2": (deberta_tokenizer, deberta_model),
}


def save_family(family: str, folder: Path, *, seed: int = 0) -> Path:
    """The tiny model of `family` with random weights (from `seed`) and its tokenizer, saved in `folder`."""
    make_tokenizer, make_model = BUILDERS[family]
    tokenizer = make_tokenizer()
    torch.manual_seed(seed)
    make_model(tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def save_families(root: Path) -> dict[str, Path]:
    """Every family saved under `root/<family>`."""
    return {family: save_family(family, root / family) for family in FAMILIES}
