"""Batches of windows: a torch Dataset over `Features`, dynamic padding, and length-aware batch orders.

Real SQuAD windows are short (about 170 tokens on average at max 384), so padding every batch to 384 wastes about
half the compute. Training batches are therefore drawn from length-sorted pools of shuffled windows, and every batch
is padded only to its own longest window (rounded up to a multiple of 8 for tensor cores). The order depends only on
(seed, epoch), so every process computes the same list of batches and Accelerate hands each process its share;
`DataOrder` walks a run through it pass by pass, resumed runs included.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from bertqa.data import Features

if TYPE_CHECKING:
    from accelerate import Accelerator

    from bertqa.training.state import TrainState

__all__ = [
    "Collator",
    "DataOrder",
    "FeatureDataset",
    "LengthGroupedBatchSampler",
    "QuestionOrderBatchSampler",
    "SortedBatchSampler",
    "eval_loader",
    "model_inputs",
    "padded_tokens",
    "train_loader",
]


def padded_tokens(batches: Sequence[Sequence[int]], lengths: np.ndarray, multiple: int = 8) -> np.ndarray:
    """Each batch's size in tokens as `Collator` pads it: windows x its longest window, rounded up to `multiple`."""
    return np.array([len(b) * math.ceil(int(lengths[b].max()) / multiple) * multiple for b in batches], dtype=np.int64)


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The batch without what the model must not see: feature indices and start/end labels."""
    return {k: v for k, v in batch.items() if k not in ("feature_index", "start_positions", "end_positions")}


class FeatureDataset(torch.utils.data.Dataset):
    """Index -> one window as plain lists; labels are included when the features have them."""

    def __init__(self, features: Features) -> None:
        self.features = features

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, i: int) -> dict[str, Any]:
        f = self.features
        item: dict[str, Any] = {"input_ids": f.input_ids[i], "feature_index": i}
        if f.token_type_ids is not None:
            item["token_type_ids"] = f.token_type_ids[i]
        if f.start_positions is not None and f.end_positions is not None:
            item["start_positions"] = int(f.start_positions[i])
            item["end_positions"] = int(f.end_positions[i])
        return item


class Collator:
    """Pad a list of windows to the longest one (rounded up to `pad_to_multiple_of`) and build the attention mask."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int = 8) -> None:
        self.pad_token_id = pad_token_id
        self.multiple = pad_to_multiple_of

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        longest = max(len(item["input_ids"]) for item in items)
        length = math.ceil(longest / self.multiple) * self.multiple
        # Filled in numpy: the rows may be read-only memory-mapped slices, which torch would warn about.
        input_ids = np.full((len(items), length), self.pad_token_id, dtype=np.int64)
        mask = np.zeros((len(items), length), dtype=np.int64)
        has_types = "token_type_ids" in items[0]
        types = np.zeros((len(items), length), dtype=np.int64) if has_types else None
        for row, item in enumerate(items):
            n = len(item["input_ids"])
            input_ids[row, :n] = item["input_ids"]
            mask[row, :n] = 1
            if types is not None:
                types[row, :n] = item["token_type_ids"]
        batch = {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(mask)}
        if types is not None:
            batch["token_type_ids"] = torch.from_numpy(types)
        for key in ("start_positions", "end_positions", "feature_index"):
            if key in items[0]:
                batch[key] = torch.tensor([item[key] for item in items], dtype=torch.long)
        return batch


class LengthGroupedBatchSampler:
    """Shuffled training batches of similar-length windows, identical on every process for a given epoch.

    Each epoch: shuffle all windows with a generator seeded by (seed, epoch), cut the order into pools of
    `pool_batches` batches, sort each pool by length and cut it into batches, then shuffle the batch order so the
    lengths seen by the optimizer stay mixed. With `group_by_length=False` it is a plain seeded shuffle.
    """

    def __init__(
        self,
        lengths: np.ndarray,
        batch_size: int,
        *,
        seed: int,
        group_by_length: bool = True,
        pool_batches: int = 50,
    ) -> None:
        self.lengths = np.asarray(lengths)
        self.batch_size = batch_size  # Accelerate reads this to shard batches across processes
        self.drop_last = False
        self.seed = seed
        self.group_by_length = group_by_length
        self.pool_batches = pool_batches
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def batches(self) -> list[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(len(self.lengths))
        if not self.group_by_length:
            return [order[i : i + self.batch_size].tolist() for i in range(0, len(order), self.batch_size)]
        pool = self.batch_size * self.pool_batches
        batches = []
        for begin in range(0, len(order), pool):
            chunk = order[begin : begin + pool]
            chunk = chunk[np.argsort(-self.lengths[chunk], kind="stable")]
            batches += [chunk[i : i + self.batch_size].tolist() for i in range(0, len(chunk), self.batch_size)]
        # Keep every batch full except the very last one, which Accelerate may pad across processes.
        full = [b for b in batches if len(b) == self.batch_size]
        partial = [i for b in batches if len(b) < self.batch_size for i in b]
        full = [full[i] for i in rng.permutation(len(full))]
        tail = [partial[i : i + self.batch_size] for i in range(0, len(partial), self.batch_size)]
        return full + tail

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches())

    def __len__(self) -> int:
        return math.ceil(len(self.lengths) / self.batch_size)


class QuestionOrderBatchSampler(LengthGroupedBatchSampler):
    """Training batches that take the questions whole, in a seeded order: what a time-budget run trains on.

    Each epoch: order the questions at random (seeded by seed and epoch) and lay out their windows in that order,
    each question's together; keep the first `limit` questions (all when None); cut the windows into pools, the
    first of `first_pool` batches (the timed warm-up of a budget run) and then `pool_batches` each; sort each pool
    by length, cut it into batches and shuffle them within the pool. So the first N questions of a pass are a seeded
    draw of N, and a run that trains on them sees every window of each. The pools before the one a limit cuts do
    not depend on the limit: a plan made after the warm-up leaves the batches already trained on as they were.
    """

    def __init__(
        self,
        lengths: np.ndarray,
        example_index: np.ndarray,
        batch_size: int,
        *,
        seed: int,
        first_pool: int,
        group_by_length: bool = True,
        pool_batches: int = 50,
    ) -> None:
        super().__init__(lengths, batch_size, seed=seed, group_by_length=group_by_length, pool_batches=pool_batches)
        self.example_index = np.asarray(example_index)
        self.questions = int(self.example_index.max()) + 1 if len(self.example_index) else 0
        self.first_pool = first_pool
        self.limit: int | None = None

    def question_rank(self, epoch: int) -> np.ndarray:
        """Each question's place in `epoch`'s order (seeded by seed and epoch alone)."""
        return np.random.default_rng([self.seed, epoch]).permutation(self.questions)

    def window_order(self, epoch: int) -> np.ndarray:
        """The epoch's windows, question by question in the epoch's question order, cut at `limit` questions."""
        rank = self.question_rank(epoch)
        order = np.argsort(rank[self.example_index], kind="stable")
        if self.limit is not None:
            order = order[rank[self.example_index[order]] < self.limit]
        return order

    def questions_windows(self, epoch: int, questions: int) -> int:
        """How many windows the first `questions` questions of `epoch` hold."""
        rank = self.question_rank(epoch)
        return int((rank[self.example_index] < questions).sum())

    def questions_within(self, epoch: int, windows: int, *, at_least: int = 0) -> int:
        """The most questions of `epoch`'s order whose windows number at most `windows` (but at least `at_least`)."""
        rank = self.question_rank(epoch)
        counts = np.bincount(rank[self.example_index], minlength=self.questions)  # windows per place in the order
        return max(at_least, int(np.searchsorted(np.cumsum(counts), windows, side="right")))

    def questions_to_keep(self, epoch: int, batches_done: int) -> int:
        """How many questions a limit must keep so that every pool holding one of the first `batches_done` batches
        (the warm-up's, at least) stays whole: those batches were trained on and must stay where they are."""
        rank = self.question_rank(epoch)
        order = np.argsort(rank[self.example_index], kind="stable")
        first, pool = self.first_pool * self.batch_size, self.pool_batches * self.batch_size
        windows = max(batches_done, 1) * self.batch_size  # the pools are whole batches, in order
        end = first if windows <= first else first + math.ceil((windows - first) / pool) * pool
        reached = order[:end]
        return int(rank[self.example_index[reached]].max()) + 1 if len(reached) else 0

    def batches(self) -> list[list[int]]:
        order = self.window_order(self.epoch)
        rng = np.random.default_rng([self.seed, self.epoch, 1])  # the batch shuffles', apart from the order's
        sizes = [self.first_pool * self.batch_size] if self.first_pool else []
        begin, batches = 0, []
        while begin < len(order):
            size = sizes.pop(0) if sizes else self.pool_batches * self.batch_size
            pool = order[begin : begin + size]
            if self.group_by_length:
                pool = pool[np.argsort(-self.lengths[pool], kind="stable")]
            cut = [pool[i : i + self.batch_size].tolist() for i in range(0, len(pool), self.batch_size)]
            full = [b for b in cut if len(b) == self.batch_size]  # pools are whole batches: only the last is short
            batches += [full[i] for i in rng.permutation(len(full))] + [b for b in cut if len(b) < self.batch_size]
            begin += size
        return batches

    def __len__(self) -> int:
        windows = len(self.lengths) if self.limit is None else self.questions_windows(self.epoch, self.limit)
        return math.ceil(windows / self.batch_size)


class SortedBatchSampler:
    """Evaluation batches in order of decreasing length (least padding); results are put back by feature index."""

    def __init__(self, lengths: np.ndarray, batch_size: int) -> None:
        self.batch_size = batch_size
        self.drop_last = False
        order = np.argsort(-np.asarray(lengths), kind="stable")
        self._batches = [order[i : i + batch_size].tolist() for i in range(0, len(order), batch_size)]

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self._batches)

    def __len__(self) -> int:
        return len(self._batches)


def eval_loader(
    features: Features, *, batch_size: int, pad_token_id: int, pad_to_multiple_of: int = 8, pin_memory: bool = False
) -> torch.utils.data.DataLoader:
    """Length-sorted evaluation batches that carry their feature indices, so results can be put back in order.

    `pin_memory` (for a GPU): batches in page-locked memory, which a non-blocking copy can move without waiting.
    """
    return torch.utils.data.DataLoader(
        FeatureDataset(features),
        batch_sampler=SortedBatchSampler(features.lengths, batch_size),
        collate_fn=Collator(pad_token_id, pad_to_multiple_of),
        pin_memory=pin_memory,
        # Its own generator: starting a loader draws a seed, and an evaluation must not shift training's dropout.
        generator=torch.Generator(),
    )


def train_loader(
    features: Features,
    *,
    batch_size: int,
    seed: int,
    group_by_length: bool,
    pad_token_id: int,
    pad_to_multiple_of: int = 8,
    num_workers: int = 0,
    pin_memory: bool = False,
    pool_batches: int = 50,
    question_order_first_pool: int | None = None,
) -> tuple[torch.utils.data.DataLoader, LengthGroupedBatchSampler]:
    """The training DataLoader and its batch sampler (whose epoch the caller sets before each pass).

    `question_order_first_pool` (a time-budget run: the warm-up's micro-batches on all processes) takes the
    questions whole in a seeded order (`QuestionOrderBatchSampler`), so the run can be cut to the questions it has
    time for.

    `pin_memory` (for a GPU): batches in page-locked memory. A copy from ordinary memory makes the host wait for
    the GPU to finish its queued work; from pinned memory, with `non_blocking`, the host can queue the next update.
    """
    sampler: LengthGroupedBatchSampler
    if question_order_first_pool is not None:
        sampler = QuestionOrderBatchSampler(
            features.lengths,
            features.example_index,
            batch_size,
            seed=seed,
            first_pool=question_order_first_pool,
            group_by_length=group_by_length,
            pool_batches=pool_batches,
        )
    else:
        sampler = LengthGroupedBatchSampler(
            features.lengths, batch_size, seed=seed, group_by_length=group_by_length, pool_batches=pool_batches
        )
    loader = torch.utils.data.DataLoader(
        FeatureDataset(features),
        batch_sampler=sampler,
        collate_fn=Collator(pad_token_id, pad_to_multiple_of),
        num_workers=num_workers,
        pin_memory=pin_memory,
        generator=torch.Generator().manual_seed(seed),  # keeps loader start-up off the global RNG (resume)
        worker_init_fn=_ignore_ctrl_c if num_workers else None,
    )
    return loader, sampler


def _ignore_ctrl_c(worker_id: int) -> None:
    """Ctrl-C reaches every process of the terminal's group: a loader worker that died of it would fail the batch
    the run still needs to finish its update and save. The main process ends its workers when it stops."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


@dataclass
class DataOrder:
    """The training batches of a run, pass by pass: each pass's order follows from (seed, epoch) alone, and a run
    resumed mid-epoch skips the micro-batches its checkpoint had consumed (`TrainState.batches_done`).

        loader, sampler = batching.train_loader(features, ...)
        model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
        order = DataOrder(loader, sampler)
        while state.step < total_steps and state.stop_reason is None:
            train_one_epoch(accelerator, model, optimizer, scheduler, order.batches(accelerator, state), ...)
            order.end_pass(state)
    """

    loader: Any  # the prepared training loader (Accelerate's DataLoaderShard)
    sampler: LengthGroupedBatchSampler

    def __len__(self) -> int:
        """Micro-batches per epoch on this process."""
        return len(self.loader)

    def batches(self, accelerator: Accelerator, state: TrainState) -> Iterable[dict[str, torch.Tensor]]:
        """This epoch's batches, or what is left of them when a resumed run starts mid-epoch."""
        # Both: Accelerate's loader re-seeds the sampler from its own pass counter, which a resumed run does not share,
        # and with several processes it does not reach a batch sampler of ours inside its shard.
        self.sampler.set_epoch(state.epoch)
        self.loader.set_epoch(state.epoch)
        done = state.batches_done
        return accelerator.skip_first_batches(self.loader, done) if done else self.loader

    def end_pass(self, state: TrainState) -> None:
        """After a pass: a whole epoch done moves `state` to the next one (a pass cut short stays in its epoch)."""
        if state.batches_done >= len(self.loader):
            state.epoch, state.batches_done = state.epoch + 1, 0
