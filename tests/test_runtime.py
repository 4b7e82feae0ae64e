"""Runtime: precision choice, the CPU allocator setting, the Accelerator and non-blocking copies."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from bertqa import sources

# Allocates and frees 64 MB (more than glibc ever serves from its heap unasked) again and again and prints how many
from bertqa.training import runtime

# pages the process faulted in over the last ten rounds: each fresh mapping of 64 MB is 16,384 faults of 4 KiB pages.
# The first rounds are left out: where the heap settles after them (two or three blocks' worth) depends on what
# else the process allocated, which is not what is being tested; so the process first imports what training imports
# (with numpy alone before it, half of the later rounds still met fresh pages here).
_REUSE = """
import resource, sys, torch
import bertqa.engine  # the heap of a training process: where blocks land depends on what was allocated first
from bertqa.training.runtime import keep_freed_memory
print(keep_freed_memory() if sys.argv[1] == "tune" else False)
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for i in range(15):
    if i == 5:
        before = faults()
    block = torch.ones(16 * 2**20)
    del block
print(faults() - before)
"""


def _faults(mode: str, **env: str) -> tuple[str, int]:
    ours = (*runtime._ALLOCATOR_ENV, runtime.KEEP_FREED_MEMORY_ENV)
    clean = {k: v for k, v in os.environ.items() if k not in ours}
    out = subprocess.run(
        [sys.executable, "-c", _REUSE, mode], env={**clean, **env}, capture_output=True, text=True, check=True
    ).stdout.split()
    return out[0], int(out[1])


@pytest.mark.e2e
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_freed_memory_is_reused_instead_of_faulted_in_again():
    page_rounds = 64 * 2**20 // 4096
    tuned, tuned_faults = _faults("tune")
    plain, plain_faults = _faults("plain")
    assert (tuned, plain) == ("True", "False")
    assert plain_faults >= 9 * page_rounds  # every allocation mapped afresh
    assert tuned_faults <= page_rounds  # mapped in the first rounds, then reused


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
@pytest.mark.parametrize("env", [{"MALLOC_TRIM_THRESHOLD_": "1"}, {runtime.KEEP_FREED_MEMORY_ENV: "0"}])
def test_an_allocator_setting_of_the_users_own_is_left_alone(env):
    applied, faults = _faults("tune", **env)
    assert applied == "False"
    assert faults >= 9 * 64 * 2**20 // 4096


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_is_bf16_only_on_cpus_that_run_it_natively(monkeypatch, native):
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: native)
    assert runtime.resolve_precision("auto", device="cpu") == ("bf16" if native else "no")
    assert runtime.resolve_precision("no", device="cpu") == "no"
    assert runtime.resolve_precision("bf16", device="cpu") == "bf16"


def test_batches_are_copied_to_the_device_without_blocking(tokenizer):
    # Pinned batches copied with non_blocking let the host queue the next update while the GPU works; a plain
    # copy from ordinary memory makes the host wait for the GPU at every batch.
    from bertqa import data
    from bertqa.batching import train_loader
    from bertqa.inference import eval_batches

    examples, _ = sources.load_examples("dev-v1.1", max_examples=8, seed=0)
    tiny_features = data.label_features(data.tokenize_examples(examples, tokenizer), examples)

    accelerator = runtime.make_accelerator()
    assert accelerator.dataloader_config.non_blocking
    loader = eval_batches(tiny_features, batch_size=4, pad_token_id=0, accelerator=accelerator)
    assert loader.pin_memory == (accelerator.device.type == "cuda")
    train, _ = train_loader(tiny_features, batch_size=4, seed=0, group_by_length=True, pad_token_id=0, pin_memory=True)
    assert train.pin_memory


@pytest.fixture
def launched(monkeypatch):
    """This process as `accelerate launch` starts one: its variables set, `cores` cores and `threads` threads."""

    def setup(*, cores: int, threads: int, local: int | None = None, by_accelerate: bool = True) -> None:
        for name in (
            "ACCELERATE_MIXED_PRECISION",
            "ACCELERATE_DYNAMO_BACKEND",
            "TORCHELASTIC_RUN_ID",
            "LOCAL_WORLD_SIZE",
        ):
            monkeypatch.delenv(name, raising=False)
        if by_accelerate:
            monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
            monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "NO")
        if local is not None:
            monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local))
        monkeypatch.setattr(runtime, "_cores_available", lambda: cores)
        monkeypatch.setattr(runtime.torch, "get_num_threads", lambda: threads)
        monkeypatch.setattr(runtime, "_said", set())
        monkeypatch.setattr(sys, "argv", ["scripts/train.py"])

    return setup


def test_a_launched_cpu_process_left_one_thread_of_several_cores_is_told_what_to_add(launched):
    launched(cores=8, threads=1)
    assert runtime.cpu_threads_advice() == (
        "accelerate launch gave this process 1 CPU thread of the 8 cores it may use: it computes at a fraction of "
        "the speed it could; add --num_cpu_threads_per_process 8 to accelerate launch, or run python "
        "scripts/train.py directly"
    )
    launched(cores=8, threads=1, local=2)  # two processes share the 8 cores: 4 each
    advice = runtime.cpu_threads_advice()
    assert "(shared by 2 processes on this machine)" in advice and "--num_cpu_threads_per_process 4" in advice
    assert "directly" not in advice  # one python process would not be the same run


@pytest.mark.parametrize(
    "setting",
    [
        {"cores": 8, "threads": 8},  # --num_cpu_threads_per_process given
        {"cores": 2, "threads": 1, "local": 2},  # each has its share
        {"cores": 1, "threads": 1},
        {"cores": 8, "threads": 1, "by_accelerate": False},  # OMP_NUM_THREADS=1 of the user's own
    ],
)
def test_no_advice_where_threads_match_the_share_or_the_launcher_did_not_set_them(launched, setting):
    launched(**setting)
    assert runtime.cpu_threads_advice() is None


def test_the_thread_warning_is_logged_once_when_the_accelerator_is_made(launched, caplog, monkeypatch):
    launched(cores=4, threads=1)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")  # as `accelerate launch --cpu` sets it (a GPU machine too)
    with caplog.at_level("WARNING", logger="bertqa"):
        runtime.make_accelerator()
        runtime.make_accelerator()  # evaluation after training, say: not again
    said = [r.getMessage() for r in caplog.records if "num_cpu_threads_per_process" in r.getMessage()]
    assert len(said) == 1 and "1 CPU thread of the 4 cores" in said[0]


ENDS = """
import torch
from bertqa.training.runtime import end_processes, make_accelerator

accelerator = make_accelerator(mixed_precision="no")
model = accelerator.prepare(torch.nn.Linear(4, 4))  # wrapped in DistributedDataParallel with two processes
with torch.no_grad():
    for _ in range(5):  # forward passes under the wrapper: what makes it abort at exit when still alive
        model(torch.ones(2, 4))
accelerator.reduce(torch.ones(1), "sum")
model = None
end_processes(accelerator)
"""


@pytest.mark.e2e
def test_a_two_process_run_ended_by_end_processes_exits_cleanly_every_time(tmp_path):
    """With the model still alive when the group was shut down, 3 of 8 such runs aborted ("terminate called without
    an active exception"): 8 clean exits in a row would come by luck about once in 40 runs of this test."""
    from tests.test_scripts import ENV, ROOT, two_processes

    script = tmp_path / "ends.py"
    script.write_text(ENDS)
    for i in range(8):
        launch = [*two_processes()[:-1], str(29640 + i)]  # a port of its own: the last one may linger
        done = subprocess.run([*launch, str(script)], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0 and "terminate called" not in done.stderr, (i, done.stderr[-2000:])


def test_a_sharded_launch_that_accelerate_did_not_shard_is_refused(monkeypatch):
    # What accelerate launch sets for an FSDP configuration (for DeepSpeed without deepspeed installed, Accelerate
    # refuses by itself).
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(RuntimeError, match=r"configured for FSDP, but Accelerate set up .* on cpu"):
        runtime.make_accelerator()


def test_peak_memory_is_the_process_peak_in_mib():
    from accelerate import Accelerator

    peak = runtime.peak_memory(Accelerator(cpu=True))
    assert peak["peak_memory_of"] == "cpu_peak_rss" and 100 < peak["peak_memory_mib"] < 64 * 1024
