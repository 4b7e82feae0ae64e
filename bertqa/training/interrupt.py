"""Ctrl-C and SIGTERM as a way to stop a run, not to lose it: `SignalCatcher` turns them into a request that the
loop honours at its next safe point, and `Interrupted` is what a run raises once it has saved a checkpoint there.

Clusters end jobs with SIGTERM (SLURM, Kubernetes, spot instances), then SIGKILL after a grace period; a person
presses Ctrl-C. Either way the first signal asks the run to finish the update it is in, save a sealed checkpoint
and stop; a second one, later than `REPEAT_S` after the first, stops at once (the checkpoints saved before stay
intact). With several processes the request is agreed every `AGREE_EVERY` updates (`SignalCatcher.requested`),
so a signal to any one process stops all of them at the same update, and they save one checkpoint together.

A loop of your own uses it like `fit` does (`recipes/own_loop.py`):

    with SignalCatcher() as signals:
        try:
            ...train_one_epoch(..., callbacks=[partial(signals.check, accelerator)])...
        except Interrupted as stop:
            if stop.at_once:  # a second signal: stop without saving
                raise
            folder = save_checkpoint(accelerator, output_dir, state.step, keep=1)
            raise Interrupted(stop.signum, step=state.step, total_steps=total, checkpoint=folder) from None
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from types import FrameType
from typing import TYPE_CHECKING, Any

from bertqa.training.state import Interrupted, signal_name

if TYPE_CHECKING:
    from accelerate import Accelerator

__all__ = ["AGREE_EVERY", "REPEAT_S", "Interrupted", "SignalCatcher", "signal_name", "stop_with_launcher"]

logger = logging.getLogger("bertqa")
# A launcher passes on the signal it got (torch's elastic agent sends Ctrl-C's SIGINT to workers that the terminal
# has already sent it to): a repeat this soon after the first is the same request, not a second Ctrl-C.
REPEAT_S = 1.0
# With several processes, a stop is agreed every this many updates, not after each: each agreement is a collective
# whose answer the host must wait for, which on a GPU would stall the queue of work every update.
AGREE_EVERY = 5


class SignalCatcher:
    """While active (a context manager), SIGINT and SIGTERM are recorded in `received` instead of ending the
    process; `requested()` says whether one came. A second signal, more than `REPEAT_S` after the first, raises
    `Interrupted` at once (nothing saved). While `at_once` is set (before there is anything to save: loading the
    data) and within `immediately()` (work that is cheap to redo: an evaluation in a one-process run) the first
    signal raises at once too.

    Signal handlers can only be installed from the main thread; elsewhere it records nothing and says so.
    The handlers that were there before are put back on exit.
    """

    def __init__(self, signals: Sequence[int] = (signal.SIGINT, signal.SIGTERM), *, at_once: bool = False) -> None:
        self.signals = tuple(signals)
        self.at_once = at_once
        self.received: int | None = None
        self._first_at = 0.0
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> SignalCatcher:
        if threading.current_thread() is not threading.main_thread():
            logger.info("not in the main thread: Ctrl-C and SIGTERM keep their usual effect (nothing is saved)")
            return self
        for signum in self.signals:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    @contextmanager
    def immediately(self, enabled: bool = True) -> Iterator[None]:
        """Within this block (when `enabled`) a signal raises `Interrupted` at once, as does one that came before
        it, on entry."""
        if not enabled:
            yield
            return
        if self.received is not None:
            raise Interrupted(self.received)
        before, self.at_once = self.at_once, True
        try:
            yield
        finally:
            self.at_once = before

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        now = time.monotonic()
        if self.received is None:
            self.received, self._first_at = signum, now
            if self.at_once:
                raise Interrupted(signum)
            again = "Ctrl-C" if signum == signal.SIGINT else signal_name(signum)
            logger.warning(
                "%s: stopping after the update in progress and saving a checkpoint (%s again to stop at once)",
                signal_name(signum),
                again,
            )
            return
        if now - self._first_at > REPEAT_S:
            raise Interrupted(signum, at_once=True)

    def check(self, accelerator: Accelerator | None = None, update: Any = None) -> None:
        """Raise `Interrupted` when a signal asked the run to stop (on any process; a collective, as `requested`).
        An update callback as `partial(signals.check, accelerator)`: with several processes it asks only every
        `AGREE_EVERY` updates; called without an update (after an evaluation), it always asks."""
        several = accelerator is not None and accelerator.num_processes > 1
        if several and update is not None and update.step % AGREE_EVERY:
            return
        signum = self.requested(accelerator)
        if signum is not None:
            raise Interrupted(signum)

    def requested(self, accelerator: Accelerator | None = None) -> int | None:
        """The signal that asks the run to stop, or None. With several processes this is a collective: every
        process must call it at the same point (after the same update), and all get the same answer, so a signal to
        any one of them stops them all together."""
        if accelerator is None or accelerator.num_processes == 1:
            return self.received
        import torch

        mine = torch.tensor([self.received or 0], device=accelerator.device)
        agreed = int(accelerator.gather(mine).max().item())
        return agreed or None


def stop_with_launcher() -> bool:
    """Under a launcher (`accelerate launch`, torchrun), have Linux send this process SIGTERM when the launcher
    ends: `accelerate launch` with one process passes no signal on, so a SIGTERM to it (what a scheduler sends)
    would otherwise leave the run going on its own until SIGKILL, instead of saving. Returns whether it was set."""
    launched = "ACCELERATE_MIXED_PRECISION" in os.environ or "TORCHELASTIC_RUN_ID" in os.environ
    if not launched or not sys.platform.startswith("linux"):
        return False
    pr_set_pdeathsig = 1  # from <sys/prctl.h>
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0) == 0
    except (OSError, AttributeError):  # no prctl in this C library: the launcher's own behaviour stays
        return False
