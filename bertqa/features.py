"""Tokenized windows stored flat: one int32 array of every window's token ids end to end, row boundaries beside it.

A list of Python lists costs about 60 bytes per token; flat arrays cost 4-9, and they can be saved as `.npy` files
and memory-mapped, so the processes of one machine share one copy of the pages. `features.input_ids[i]` still reads
like a list of rows: it is a `Ragged` view that slices the flat array.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

__all__ = ["Features", "Ragged"]


@dataclass(frozen=True, eq=False)
class Ragged:
    """Rows of different lengths over one flat array: `ragged[i]` is `values[bounds[i]:bounds[i + 1]]` (no copy)."""

    values: np.ndarray
    bounds: np.ndarray

    def __len__(self) -> int:
        return len(self.bounds) - 1

    def __getitem__(self, i: int) -> np.ndarray:
        return self.values[self.bounds[i] : self.bounds[i + 1]]

    def __iter__(self) -> Iterator[np.ndarray]:
        return (self[i] for i in range(len(self)))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Ragged):
            return NotImplemented
        return np.array_equal(self.bounds, other.bounds) and np.array_equal(self.values, other.values)

    __hash__ = None  # type: ignore[assignment]


@dataclass
class Features:
    """Tokenized windows, unpadded (batches are padded when they are formed, to their own longest window).

    Window i is tokens `bounds[i]:bounds[i + 1]` of the flat arrays: `ids` (token ids), `type_ids` (segment ids, or
    None for models without them) and `token_offsets`, each token's [start, end) characters in the context and -1
    for tokens outside it (question, special tokens) or holding none of its characters (a lone space or "▁"), so
    post-processing never starts or ends a span on them. Context offsets rise strictly, never overlap, and never
    start or end on whitespace, whatever the tokenizer (`bertqa.data`). `start_positions` and `end_positions` are
    set by `bertqa.data.label_features` (the CLS index when the window holds no answer).
    """

    bounds: np.ndarray
    ids: np.ndarray
    type_ids: np.ndarray | None
    token_offsets: np.ndarray
    example_index: np.ndarray
    cls_index: np.ndarray
    start_positions: np.ndarray | None = None
    end_positions: np.ndarray | None = None
    lengths: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.lengths = np.diff(self.bounds)

    def __len__(self) -> int:
        return len(self.bounds) - 1

    @property
    def input_ids(self) -> Ragged:
        return Ragged(self.ids, self.bounds)

    @property
    def token_type_ids(self) -> Ragged | None:
        return None if self.type_ids is None else Ragged(self.type_ids, self.bounds)

    @property
    def offsets(self) -> Ragged:
        return Ragged(self.token_offsets, self.bounds)

    @classmethod
    def from_rows(
        cls,
        ids: Sequence[Sequence[int]],
        type_ids: Sequence[Sequence[int]] | None,
        offsets: Sequence[np.ndarray],
        example_index: np.ndarray,
        cls_index: np.ndarray,
    ) -> Features:
        """Windows given row by row (lists or arrays)."""
        lengths = np.fromiter((len(row) for row in ids), dtype=np.int64, count=len(ids))

        def flat(rows: Sequence, dtype: type) -> np.ndarray:
            return np.concatenate([np.asarray(r, dtype=dtype) for r in rows]) if len(rows) else np.zeros(0, dtype)

        return cls(
            bounds=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
            ids=flat(ids, np.int32),
            type_ids=None if type_ids is None else flat(type_ids, np.int8),
            token_offsets=flat(offsets, np.int32).reshape(-1, 2),
            example_index=np.asarray(example_index, dtype=np.int64),
            cls_index=np.asarray(cls_index, dtype=np.int64),
        )

    @classmethod
    def concat(cls, parts: Sequence[Features], example_offsets: Sequence[int]) -> Features:
        """The windows of `parts` one after the other; part k's example indices are shifted by `example_offsets[k]`."""
        starts = np.cumsum([0] + [len(p.ids) for p in parts[:-1]])
        labelled = all(p.start_positions is not None for p in parts)
        joined = cls(
            bounds=np.concatenate([[0]] + [p.bounds[1:] + s for p, s in zip(parts, starts)]).astype(np.int64),
            ids=np.concatenate([p.ids for p in parts]),
            type_ids=None if parts[0].type_ids is None else np.concatenate([p.type_ids for p in parts]),
            token_offsets=np.concatenate([p.token_offsets for p in parts]),
            example_index=np.concatenate([p.example_index + k for p, k in zip(parts, example_offsets)]),
            cls_index=np.concatenate([p.cls_index for p in parts]),
        )
        if labelled:
            joined.start_positions = np.concatenate([p.start_positions for p in parts])
            joined.end_positions = np.concatenate([p.end_positions for p in parts])
        return joined

    def select(self, rows: Sequence[int] | np.ndarray) -> Features:
        """A copy holding only windows `rows`, in that order (example indices unchanged)."""
        rows = np.asarray(rows, dtype=np.int64)
        tokens = np.concatenate([np.arange(self.bounds[r], self.bounds[r + 1]) for r in rows]) if len(rows) else []
        tokens = np.asarray(tokens, dtype=np.int64)
        picked = Features(
            bounds=np.concatenate([[0], np.cumsum(self.lengths[rows])]).astype(np.int64),
            ids=self.ids[tokens],
            type_ids=None if self.type_ids is None else self.type_ids[tokens],
            token_offsets=self.token_offsets[tokens],
            example_index=self.example_index[rows],
            cls_index=self.cls_index[rows],
        )
        if self.start_positions is not None and self.end_positions is not None:
            picked.start_positions, picked.end_positions = self.start_positions[rows], self.end_positions[rows]
        return picked

    def arrays(self) -> dict[str, np.ndarray]:
        """Every array by name (None ones left out): what the window cache saves."""
        names = ("bounds", "ids", "type_ids", "token_offsets", "example_index", "cls_index")
        names += ("start_positions", "end_positions")
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> Features:
        optional = ("type_ids", "start_positions", "end_positions")
        return cls(**{**{name: None for name in optional}, **arrays})
