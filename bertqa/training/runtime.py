"""Where a run executes and in what precision: the precision choice, CPU feature detection, the C allocator setting,
and the Accelerator that training, evaluation and serving all build on.

Training (`bertqa.engine`), the evaluation script and serving (`bertqa.deploy.serving`) take their runtime from here,
so a CPU with native bf16 is detected once, in one way, and a custom loop gets the same Accelerator `fit` uses.
"""

from __future__ import annotations

import ctypes
import functools
import gc
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from accelerate import Accelerator

__all__ = [
    "KEEP_FREED_MEMORY_ENV",
    "accelerate_launcher",
    "check_trackers",
    "cpu_has_native_bf16",
    "cpu_threads_advice",
    "end_processes",
    "keep_freed_memory",
    "make_accelerator",
    "peak_memory",
    "precision_reason",
    "resolve_precision",
    "sharding",
    "slowest_process",
]

logger = logging.getLogger("bertqa")


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (AMX or AVX512-BF16), where bf16 autocast is much faster."""
    if os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper() in _ISA_WITHOUT_BF16:  # the kernels are held below bf16
        return False
    probes = (getattr(torch.cpu, "_is_amx_tile_supported", None), getattr(torch.cpu, "_is_avx512_bf16_supported", None))
    return any(probe is not None and probe() for probe in probes)


# oneDNN instruction-set limits (ONEDNN_MAX_CPU_ISA) under which its matmuls cannot use bf16 instructions.
_ISA_WITHOUT_BF16 = frozenset({"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI"})


def resolve_precision(mode: str, *, device: str | None = None) -> str:
    """ "auto" -> bf16 where the hardware runs it natively (a GPU that supports it, or a CPU with AMX or
    AVX512-BF16), otherwise full precision; fp16 only when asked for. `device` defaults to the GPU if there is one.
    On such CPUs bf16 trained 1.8x and evaluated 2.4x faster than fp32, to the same F1 (docs/BENCHMARKS.md)."""
    if mode != "auto":
        return mode
    if (device or ("cuda" if torch.cuda.is_available() else "cpu")) == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "no"
    return "bf16" if cpu_has_native_bf16() else "no"


def precision_reason(mode: str, *, device: str | None = None) -> str:
    """The precision `resolve_precision` picks for `mode`, and why, as a person reads it at the start of a run:
    "fp32: this CPU has no native bf16 (AVX2 only)", so a user on slower hardware knows what to expect."""
    chosen = resolve_precision(mode, device=device)
    name = "fp32" if chosen == "no" else chosen
    if mode != "auto":
        return f"{name}: asked for (mixed precision {mode})"
    if (device or ("cuda" if torch.cuda.is_available() else "cpu")) == "cuda":
        return f"{name}: this GPU {'runs bf16' if chosen == 'bf16' else 'has no bf16'}"
    if chosen == "bf16":
        amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
        return f"bf16: this CPU computes bf16 natively ({'AMX' if amx else 'AVX512-BF16'})"
    isa = torch.backends.cpu.get_cpu_capability()
    return f"fp32: this CPU has no native bf16 ({isa} only), so bf16 would be slower"


# Set by a user who tunes the C allocator (or replaces it) themselves: then bertqa leaves it alone.
_ALLOCATOR_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "GLIBC_TUNABLES", "LD_PRELOAD")
KEEP_FREED_MEMORY_ENV = "BERTQA_KEEP_FREED_MEMORY"  # "0": leave glibc's defaults (e.g. to measure what this gains)


@functools.cache
def keep_freed_memory() -> bool:
    """Let glibc keep freed memory for reuse instead of handing it back to the OS; True if it took effect.

    On a CPU every training step allocates and frees activations of tens of MB. glibc serves blocks that large with
    mmap and returns them on free, so each step faults its pages in (and zeroes them) again: on a 2-core machine a
    fifth of a bf16 training step went to the kernel, and this setting made training 1.26x faster. It is what
    preloading jemalloc or tcmalloc does for PyTorch on CPUs, without a library to install. The process keeps its
    peak memory instead of shrinking after a peak. Skipped off glibc, where the environment already sets the
    allocator's thresholds or preloads a library, and with BERTQA_KEEP_FREED_MEMORY=0.
    """
    if not sys.platform.startswith("linux") or any(os.environ.get(name) for name in _ALLOCATOR_ENV):
        return False
    if os.environ.get(KEEP_FREED_MEMORY_ENV, "1") == "0":
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (musl, ...)
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's malloc.h
    # mallopt takes a C int: 1 GiB and 2 GiB - 1 are the largest round values that fit (a larger one would wrap).
    done = bool(mallopt(m_mmap_threshold, 2**30)) and bool(mallopt(m_trim_threshold, 2**31 - 1))
    logger.debug("glibc keeps freed memory for reuse: %s", done)
    return done


def slowest_process(accelerator: Accelerator) -> Callable[[list[float]], list[float]]:
    """A function that gives every process the largest of each value over all processes: one set of numbers to
    decide from (a stop, say, which every process must take alike or the others wait for it forever)."""
    if accelerator.num_processes == 1:
        return list
    device = accelerator.device

    def slowest(values: list[float]) -> list[float]:
        gathered = accelerator.gather(torch.tensor([values], dtype=torch.float64, device=device))
        return [float(v) for v in gathered.max(dim=0).values]

    return slowest


def peak_memory(accelerator: Accelerator) -> dict[str, Any]:
    """The most memory any process has used so far, in MiB: on a GPU what PyTorch allocated on it (its caching
    allocator holds a little more), elsewhere the process's peak resident set (model, optimizer, activations, data
    and the libraries: all of it). Every process must call it (the peak is the largest of theirs)."""
    device = accelerator.device
    if device.type == "cuda":
        mib, of = torch.cuda.max_memory_allocated(device) / 2**20, "gpu_max_allocated"
    else:
        mib, of = _peak_rss_mib(), "cpu_peak_rss"
    if accelerator.num_processes > 1 and mib is not None:
        mib = accelerator.gather(torch.tensor([mib], device=device)).max().item()
    return {"peak_memory_mib": None if mib is None else round(mib, 1), "peak_memory_of": of}


def _peak_rss_mib() -> float | None:
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux


def check_trackers(names: Sequence[str]) -> None:
    """Refuse tracker names that are not installed: Accelerate would only warn, and the run would go unrecorded."""
    from accelerate.tracking import get_available_trackers

    available = sorted(str(getattr(t, "value", t)) for t in get_available_trackers())
    missing = [name for name in names if name not in available and name != "all"]
    if missing:
        raise ValueError(
            f"report_to names trackers that are not installed: {', '.join(missing)} (installed: "
            f"{', '.join(available) or 'none'}); pip install {' '.join(missing)}, or leave them out"
        )


def accelerate_launcher() -> str | None:
    """How `accelerate launch` started this process: "simple" when it ran the script itself (one process, or
    mpirun; when the script fails it raises a `CalledProcessError` traceback of its own unless given `--quiet`),
    "torchrun" when it went through torch's elastic agent (`--multi_gpu` and the like; a failure is reported with a
    `ChildFailedError` traceback, `--quiet` or not), None when it did not start this process."""
    # Every launcher of accelerate's sets both; a user who sets one to configure an Accelerator rarely sets the other.
    if "ACCELERATE_MIXED_PRECISION" not in os.environ or "ACCELERATE_DYNAMO_BACKEND" not in os.environ:
        return None
    return "torchrun" if "TORCHELASTIC_RUN_ID" in os.environ else "simple"


def _cores_available() -> int:
    """The cores this process may run on (its affinity mask: a container or `taskset` may allow fewer than the
    machine has)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def _processes_on_this_machine() -> int:
    for name in ("LOCAL_WORLD_SIZE", "MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE", "MV2_COMM_WORLD_LOCAL_SIZE"):
        value = os.environ.get(name, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    return 1


def cpu_threads_advice() -> str | None:
    """What to say when `accelerate launch` started this process with fewer CPU threads than its share of the
    cores (the cores it may use over the processes on this machine), else None. The launcher sets OMP_NUM_THREADS
    to `--num_cpu_threads_per_process`, 1 unless given (or unless `--cpu` lets it count physical cores), so one
    process on a 2-core CPU computes on half of it. The thread count is left as it is: it may be what the user
    asked for."""
    if accelerate_launcher() is None:
        return None
    threads, cores, processes = torch.get_num_threads(), _cores_available(), _processes_on_this_machine()
    share = cores // processes
    if threads >= share:
        return None
    fix = f"add --num_cpu_threads_per_process {share} to accelerate launch"
    if processes == 1:
        fix += f", or run python {sys.argv[0] or 'the script'} directly"
    on = f" (shared by {processes} processes on this machine)" if processes > 1 else ""
    return (
        f"accelerate launch gave this process {threads} CPU thread{'s' if threads != 1 else ''} of the {cores} "
        f"cores it may use{on}: it computes at a fraction of the speed it could; {fix}"
    )


_said: set[str] = set()  # warnings given once per process, however many Accelerators it makes


def make_accelerator(
    *, timeout_s: float = 1800, step_scheduler_with_optimizer: bool = False, **kwargs: Any
) -> Accelerator:
    """An Accelerator that is right for a training loop of your own as well as for `fit`.

    - The learning-rate schedule counts optimizer updates whatever the number of processes: Accelerate's default
      (`step_scheduler_with_optimizer=True`) makes a *prepared* scheduler step once per process per update, so with
      8 processes the schedule would run 8x too fast. Here a prepared scheduler steps once per `scheduler.step()`.
    - Several processes without a GPU (torchrun, `accelerate launch --multi_gpu` on a CPU machine) become CPU data
      parallelism over gloo instead of silently running as independent single processes.
    - A collective that waits more than `timeout_s` seconds for another process (one that stalled or died) fails
      instead of hanging forever.
    - Without a GPU, glibc is first told to keep freed memory (`keep_freed_memory`).
    - Prepared loaders copy batches to the device without blocking, so with pinned batches (`train_loader`'s
      `pin_memory`) no update waits on the copy.
    - On a CPU, a warning (once, from the main process) when `accelerate launch` left it fewer threads than its
      share of the cores (`cpu_threads_advice`).
    Other keyword arguments go to `accelerate.Accelerator` (mixed_precision, gradient_accumulation_steps, ...).
    """
    from datetime import timedelta

    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, is_initialized
    from accelerate.utils import DataLoaderConfiguration, InitProcessGroupKwargs

    multi_process = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if not torch.cuda.is_available():
        keep_freed_memory()
    timeout = InitProcessGroupKwargs(timeout=timedelta(seconds=timeout_s))
    if is_initialized() and kwargs.get("mixed_precision") not in (None, AcceleratorState().mixed_precision):
        # One process holds one Accelerate state: a second run in the same process keeps the first's precision.
        logger.warning(
            "this process already runs in %s precision; %s is used instead of %s",
            *(AcceleratorState().mixed_precision, AcceleratorState().mixed_precision, kwargs["mixed_precision"]),
        )
        kwargs["mixed_precision"] = AcceleratorState().mixed_precision
    kwargs.setdefault("dataloader_config", DataLoaderConfiguration(non_blocking=True))
    accelerator = Accelerator(
        cpu=multi_process and not torch.cuda.is_available(),
        kwargs_handlers=[timeout],
        step_scheduler_with_optimizer=step_scheduler_with_optimizer,
        **kwargs,
    )
    if accelerator.device.type == "cpu" and accelerator.is_main_process and "threads" not in _said:
        advice = cpu_threads_advice()
        if advice is not None:
            _said.add("threads")
            logger.warning(advice)
    check_sharding(accelerator)
    return accelerator


# What `accelerate launch` sets in the environment of each process for a sharded configuration.
SHARDING_ENV = {"ACCELERATE_USE_FSDP": "FSDP", "ACCELERATE_USE_DEEPSPEED": "DeepSpeed"}


def sharding(accelerator: Accelerator) -> str | None:
    """FSDP or DeepSpeed when the accelerator shards the model (None: each process holds all of it)."""
    return {"FSDP": "FSDP", "DEEPSPEED": "DeepSpeed"}.get(accelerator.distributed_type.value)


def check_sharding(accelerator: Accelerator) -> None:
    """Refuse a launch whose FSDP or DeepSpeed configuration Accelerate did not apply. On CPU processes Accelerate
    (1.16) sets up neither: it runs plain data parallelism, each process holding the whole model, and says
    nothing, so a model that was to be sharded to fit would not be."""
    asked = [name for var, name in SHARDING_ENV.items() if os.environ.get(var, "").lower() == "true"]
    if asked and sharding(accelerator) is None:
        raise RuntimeError(
            f"accelerate launch was configured for {asked[0]}, but Accelerate set up {accelerator.distributed_type} "
            f"on {accelerator.device.type}: it applies {asked[0]} only on GPUs (and other accelerators), so every "
            "process would hold the whole model. On CPUs launch without that configuration (accelerate launch "
            "--num_processes N: data parallelism); docs/MEMORY.md has the sharded configurations for GPUs"
        )


def end_processes(accelerator: Accelerator) -> None:
    """End a run's use of its processes: let go of what `prepare` wrapped, then shut the process group down (and
    finish the trackers). Drop your own references to the prepared model first. A DistributedDataParallel model
    still alive when its group is shut down, or at the interpreter's exit, aborts the process about half the time
    ("terminate called without an active exception": 7 of 16 two-process runs here, 0 of 16 with the model freed
    first); a group left open to the exit does the same (10 of 24)."""
    accelerator.free_memory()
    gc.collect()  # a wrapper held only in reference cycles goes now, not at the exit
    accelerator.end_training()
