"""The transformers.Trainer baseline as run_qa.py sets it up, shared by benchmark.py and trainer_baseline.py.

run_qa.py pads every window to max_seq_length (its default `pad_to_max_length=True`) and hands the Trainer a
dataset of fixed-length rows with `default_data_collator`; nothing else about the loop is customised. The rows are
held in tensors here rather than in a `datasets.Dataset`: the Trainer takes either, and this way the baseline runs
where `datasets` is not installed.
"""

from __future__ import annotations

from typing import Any

import torch

from bertqa.data import Features


class PaddedWindows(torch.utils.data.Dataset):
    """Windows padded to one width, as dicts of tensors (what `default_data_collator` stacks into a batch)."""

    def __init__(self, columns: dict[str, torch.Tensor]) -> None:
        self.columns = columns

    def __len__(self) -> int:
        return len(next(iter(self.columns.values())))

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {name: column[i] for name, column in self.columns.items()}


def padded_dataset(features: Features, *, width: int, pad_token_id: int, labelled: bool) -> PaddedWindows:
    """The windows, each padded to `width` tokens, with start/end labels when `labelled`."""
    n = len(features)
    columns = {
        "input_ids": torch.full((n, width), pad_token_id, dtype=torch.long),
        "attention_mask": torch.zeros((n, width), dtype=torch.long),
    }
    if features.token_type_ids is not None:
        columns["token_type_ids"] = torch.zeros((n, width), dtype=torch.long)
    for i, ids in enumerate(features.input_ids):
        columns["input_ids"][i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        columns["attention_mask"][i, : len(ids)] = 1
        if features.token_type_ids is not None:
            columns["token_type_ids"][i, : len(ids)] = torch.tensor(features.token_type_ids[i], dtype=torch.long)
    if labelled:
        columns["start_positions"] = torch.as_tensor(features.start_positions, dtype=torch.long)
        columns["end_positions"] = torch.as_tensor(features.end_positions, dtype=torch.long)
    return PaddedWindows(columns)


def training_arguments(output_dir: str, *, precision: str, seed: int, **overrides: Any) -> Any:
    """TrainingArguments with run_qa.py's choices: no checkpoints or trackers here, the given precision and seed."""
    import torch
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=output_dir,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        save_strategy="no",
        report_to="none",
        seed=seed,
        use_cpu=not torch.cuda.is_available(),
        **overrides,
    )
