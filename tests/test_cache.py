"""The window cache: a hit returns the same windows, anything that changes them changes the key."""

from __future__ import annotations

import numpy as np

from bertqa import data
from bertqa.cache import cached_features, features_key
from bertqa.data import Window

WINDOW = Window(128, 32, 32)


def same(a: data.Features, b: data.Features) -> bool:
    return (
        a.input_ids == b.input_ids
        and a.token_type_ids == b.token_type_ids
        and all(np.array_equal(x, y) for x, y in zip(a.offsets, b.offsets))
        and np.array_equal(a.example_index, b.example_index)
        and np.array_equal(a.start_positions, b.start_positions)
    )


def test_cache_hit_returns_identical_windows(tmp_path, tokenizer):
    examples, _ = data.load_examples("dev-v1.1", max_examples=30, seed=0)
    fresh = cached_features(examples, tokenizer, WINDOW, cache_dir=None, labelled=True)
    first = cached_features(examples, tokenizer, WINDOW, cache_dir=tmp_path, labelled=True)
    files = list(tmp_path.glob("windows-*.pkl"))
    assert len(files) == 1
    second = cached_features(examples, tokenizer, WINDOW, cache_dir=tmp_path, labelled=True)
    assert same(fresh, first) and same(first, second)
    files[0].write_bytes(b"damaged")
    assert same(fresh, cached_features(examples, tokenizer, WINDOW, cache_dir=tmp_path, labelled=True))


def test_key_changes_with_everything_the_windows_depend_on(tokenizer):
    examples, _ = data.load_examples("dev-v1.1", max_examples=5, seed=0)
    key = features_key(examples, tokenizer, WINDOW, labelled=True)
    assert key == features_key(list(examples), tokenizer, WINDOW, labelled=True)
    assert key != features_key(examples, tokenizer, WINDOW, labelled=False)
    assert key != features_key(examples, tokenizer, Window(128, 16, 32), labelled=True)
    assert key != features_key(examples[1:], tokenizer, WINDOW, labelled=True)
    edited = [examples[0].__class__(**{**_fields(examples[0]), "question": "Other?"}), *examples[1:]]
    assert key != features_key(edited, tokenizer, WINDOW, labelled=True)


def _fields(ex: data.Example) -> dict:
    return {name: getattr(ex, name) for name in ex.__slots__}
