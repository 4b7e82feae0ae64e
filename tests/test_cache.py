"""The window cache: a hit returns the same windows, anything that changes them changes the key; runs sharing it
and caches that cannot be written lose nothing."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from bertqa import data, sources
from bertqa.cache import cached_features, features_key, prepare_data
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


# ------------------------------------------------------------------------------------- shared and unwritable caches


@pytest.mark.e2e
def test_two_runs_started_together_on_a_cold_cache_both_finish_and_share_its_entries(tmp_path, tiny_dir):
    from tests.test_scripts import ENV, ROOT, SMALL

    cache = tmp_path / "cache"
    args = [
        "--model",
        str(tiny_dir),
        *[a for a in SMALL if a not in ("--cache-dir", "none")],
        "--epochs",
        "1",
        "--max-train-examples",
        "400",
        "--cache-dir",
        str(cache),
    ]
    logs = {name: (tmp_path / f"{name}.out", tmp_path / f"{name}.err") for name in ("a", "b")}
    runs = []
    for name, (out, err) in logs.items():  # files, not pipes: a run blocked on a full pipe would hold the lock
        cmd = [sys.executable, str(ROOT / "scripts" / "train.py"), *args, "--output-dir", str(tmp_path / name)]
        runs.append(subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=out.open("w"), stderr=err.open("w")))
    codes = [proc.wait(timeout=600) for proc in runs]
    results = [(code, out.read_text(), err.read_text()) for code, (out, err) in zip(codes, logs.values())]
    for code, _, err in results:
        assert code == 0, err[-3000:]
    scores = [json.loads(out.strip().splitlines()[-1])["f1"] for _, out, _ in results]
    assert scores[0] == scores[1]  # the same windows, whoever wrote them
    entries = sorted(p.name for p in cache.iterdir() if not p.name.startswith("."))  # not the locks
    assert len(entries) == 2 and all(name.startswith("windows-") for name in entries)  # train and eval, no leftovers
    # Each entry has one writer: a run may wait for the other on one entry and be waited for on the next, but no
    # entry is waited for by both.
    waited = [set(re.findall(r"writing window cache entry (\S+)", err)) for _, _, err in results]
    assert not waited[0] & waited[1], waited


def test_a_run_that_finds_the_entry_being_written_waits_for_it(tmp_path, tokenizer, caplog):
    import time

    examples, _ = sources.load_examples("dev-v1.1", max_examples=12, seed=0)
    key = features_key(examples, tokenizer, WINDOW, labelled=True)
    holder = subprocess.Popen(  # another process, busy writing that entry for a second
        [
            sys.executable,
            "-c",
            "import sys, time; from filelock import FileLock; lock = FileLock(sys.argv[1]); "
            "lock.acquire(); print('held', flush=True); time.sleep(1.5)",
            str(tmp_path / f".windows-{key}.lock"),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "held"
    t0 = time.perf_counter()
    with caplog.at_level("INFO", logger="bertqa"):
        got = cached_features(examples, tokenizer, WINDOW, cache_dir=tmp_path, labelled=True)
    assert time.perf_counter() - t0 > 0.5 and holder.wait() == 0
    assert any(
        "waiting for another process that is writing window cache entry" in r.getMessage() for r in caplog.records
    )
    assert same(got, cached_features(examples, tokenizer, WINDOW, cache_dir=None, labelled=True))


@pytest.fixture
def read_only_dir(tmp_path):
    """A folder no write reaches: a read-only tmpfs where mounting is allowed, else permissions (not as root)."""
    folder = tmp_path / "ro"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        if os.geteuid() == 0:
            pytest.skip("as root without mount, nothing makes a folder read-only")
        folder.chmod(0o555)
    yield folder
    if mounted.returncode == 0:
        subprocess.run(["umount", str(folder)], check=True)


def test_a_cache_that_cannot_be_written_warns_once_and_the_run_goes_on(read_only_dir, tokenizer, caplog):
    examples = sources.run_examples(
        train_data="dev-v1.1", eval_data="dev-v1.1", max_train_examples=12, max_eval_examples=6, seed=0
    )
    for cache_dir in (read_only_dir, read_only_dir / "below"):  # the folder, or one that cannot be made in it
        caplog.clear()
        with caplog.at_level("WARNING", logger="bertqa"):
            run = prepare_data(examples, tokenizer, window=WINDOW, cache_dir=cache_dir)
        warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
        assert len(warnings) == 1 and f"window cache {cache_dir} cannot be written" in warnings[0], warnings
        fresh = cached_features(examples.train, tokenizer, WINDOW, cache_dir=None, labelled=True)
        assert same(run.train_features, fresh) and len(run.eval_features.ids) > 0
    assert not list(read_only_dir.iterdir())


def test_a_cache_entry_that_fails_to_write_is_removed_and_the_windows_still_returned(tmp_path, tokenizer, caplog):
    import resource
    import signal

    examples, _ = sources.load_examples("dev-v1.1", max_examples=30, seed=0)
    fresh = cached_features(examples, tokenizer, WINDOW, cache_dir=None, labelled=True)
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, limit[1]))  # a disk that fills after 4 KiB, for this test
    try:
        with caplog.at_level("WARNING", logger="bertqa"):
            got = cached_features(examples, tokenizer, WINDOW, cache_dir=tmp_path, labelled=True)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limit)
        signal.signal(signal.SIGXFSZ, previous)
    assert same(got, fresh)
    assert any("could not be written" in r.getMessage() for r in caplog.records)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("windows-")]  # no partial entry left


def test_a_writer_stopped_mid_write_leaves_nothing_the_next_one_does_not_clear(tmp_path, tokenizer, monkeypatch):
    from bertqa import cache

    examples, _ = sources.load_examples("dev-v1.1", max_examples=12, seed=0)
    features = cached_features(examples, tokenizer, WINDOW, cache_dir=None, labelled=True)
    folder = tmp_path / f"windows-{features_key(examples, tokenizer, WINDOW, labelled=True)}"

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt  # Ctrl-C in the middle of writing the arrays

    with monkeypatch.context() as m:
        m.setattr(np, "save", stopped)
        with pytest.raises(KeyboardInterrupt):
            cache.write_entry(folder, features)
    assert not list(tmp_path.iterdir())  # its own temporary folder went with it
    (tmp_path / f"{folder.name}.4242.tmp").mkdir()  # what a SIGKILL mid-write leaves
    cached_features(examples, tokenizer, WINDOW, cache_dir=tmp_path, labelled=True)
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == [folder.name]
