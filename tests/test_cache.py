"""The window cache: a hit returns the same windows, anything that changes them changes the key."""

from __future__ import annotations

import numpy as np
import pytest

from bertqa import data, sources
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


def test_cache_hit_returns_identical_windows_memory_mapped(tmp_path, tokenizer):
    examples, _ = sources.load_examples("dev-v1.1", max_examples=30, seed=0)
    fresh = cached_features(examples, tokenizer, WINDOW, cache_dir=None, labelled=True)
    first = cached_features(examples, tokenizer, WINDOW, cache_dir=tmp_path, labelled=True)
    entries = list(tmp_path.glob("windows-*"))
    assert len(entries) == 1 and (entries[0] / "manifest.json").is_file()
    second = cached_features(examples, tokenizer, WINDOW, cache_dir=tmp_path, labelled=True)
    assert isinstance(second.ids, np.memmap)  # read from disk, not rebuilt
    assert same(fresh, first) and same(first, second)


def flip_last_byte(path):
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 1
    path.write_bytes(bytes(raw))


def truncate(path):
    path.write_bytes(path.read_bytes()[:200])


DAMAGE = {
    "flipped bit": lambda entry: flip_last_byte(entry / "ids.npy"),
    "truncated": lambda entry: (entry / "token_offsets.npy").write_bytes(
        (entry / "token_offsets.npy").read_bytes()[:200]
    ),
    "wrong object": lambda entry: np.save(entry / "ids.npy", np.zeros(3)),
    "garbage manifest": lambda entry: (entry / "manifest.json").write_text("{not json"),
    "missing array": lambda entry: (entry / "bounds.npy").unlink(),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_entry_is_rebuilt_with_a_warning_never_used(tmp_path, tokenizer, caplog, damage):
    examples, _ = sources.load_examples("dev-v1.1", max_examples=12, seed=0)
    fresh = cached_features(examples, tokenizer, WINDOW, cache_dir=None, labelled=True)
    cached_features(examples, tokenizer, WINDOW, cache_dir=tmp_path, labelled=True)
    DAMAGE[damage](next(tmp_path.glob("windows-*")))
    with caplog.at_level("WARNING", logger="bertqa"):
        rebuilt = cached_features(examples, tokenizer, WINDOW, cache_dir=tmp_path, labelled=True)
    assert same(fresh, rebuilt) and "damaged" in caplog.text
    again = cached_features(examples, tokenizer, WINDOW, cache_dir=tmp_path, labelled=True)  # the rebuilt entry
    assert isinstance(again.ids, np.memmap) and same(fresh, again)


def test_key_changes_with_everything_the_windows_depend_on(tokenizer):
    examples, _ = sources.load_examples("dev-v1.1", max_examples=5, seed=0)
    key = features_key(examples, tokenizer, WINDOW, labelled=True)
    assert key == features_key(list(examples), tokenizer, WINDOW, labelled=True)
    assert key != features_key(examples, tokenizer, WINDOW, labelled=False)
    assert key != features_key(examples, tokenizer, Window(128, 16, 32), labelled=True)
    assert key != features_key(examples[1:], tokenizer, WINDOW, labelled=True)
    for field, value in (("question", "Other?"), ("context", examples[0].context + " More."), ("id", "other")):
        edited = [examples[0].__class__(**{**_fields(examples[0]), field: value}), *examples[1:]]
        assert key != features_key(edited, tokenizer, WINDOW, labelled=True), field


def test_key_is_the_same_after_the_tokenizer_was_used(tokenizer):
    # A fast tokenizer carries its last call's truncation settings in its definition; they must not move the key.
    examples, _ = sources.load_examples("dev-v1.1", max_examples=5, seed=0)
    before = features_key(examples, tokenizer, WINDOW, labelled=True)
    data.tokenize_examples(examples, tokenizer, Window(64, 16, 16))
    assert features_key(examples, tokenizer, WINDOW, labelled=True) == before


def _fields(ex: data.Example) -> dict:
    return {name: getattr(ex, name) for name in ex.__slots__}
