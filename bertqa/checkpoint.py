"""Checkpoint folders that a crash cannot corrupt.

`accelerator.save_state` writes into `step_XXXXXXXX.tmp`, which is renamed to `step_XXXXXXXX` only once every
process has finished writing. A kill during a save leaves a `.tmp` folder that is ignored and later removed, and the
last complete checkpoint stays untouched; old checkpoints are pruned only after the new one is in place. Saved
models (`best_model/`, `final_model/`) are replaced the same way.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from accelerate import Accelerator

__all__ = [
    "checkpoint_dir",
    "latest_checkpoint",
    "list_checkpoints",
    "resolve_resume",
    "save_checkpoint",
    "save_model",
]

_NAME = re.compile(r"^step_(\d{8})$")


def checkpoint_dir(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / "checkpoints" / f"step_{step:08d}"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _NAME.match(p.name)]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))  # type: ignore[union-attr]


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def resolve_resume(resume: str | None, output_dir: str | Path) -> Path | None:
    """`None` -> no resume; `"latest"` -> the newest checkpoint in output_dir (None if there is none yet); a path.

    Starting afresh where an earlier run left checkpoints is refused: it would mix two runs' records.
    """
    if resume is None:
        if latest_checkpoint(output_dir) is not None:
            raise ValueError(
                f"{output_dir} already holds checkpoints of an earlier run; resume it with resume='latest' "
                "(--resume latest) or choose another output_dir"
            )
        return None
    if resume == "latest":
        return latest_checkpoint(output_dir)
    path = Path(resume)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint to resume from does not exist: {path}")
    return path


def save_checkpoint(accelerator: Accelerator, output_dir: str | Path, step: int, *, keep: int) -> Path:
    """Save the full training state (model, optimizer, registered objects, RNG) atomically; keep the newest `keep`."""
    final = checkpoint_dir(output_dir, step)
    if final.is_dir():
        return final  # this update is already saved (e.g. a periodic save that fell on an epoch end)
    tmp = final.with_name(final.name + ".tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.parent.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        os.replace(tmp, final)
        for old in list_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in final.parent.glob("*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def save_model(accelerator: Accelerator, model: Any, tokenizer: Any, path: Path, meta: dict[str, Any]) -> None:
    """save_pretrained model + tokenizer (loadable with plain transformers) and bertqa.json with the settings used.

    For v2 models `no_answer_threshold` is the best-F1 threshold found on the evaluation set.
    """
    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(model)
    tmp = path.with_name(path.name + ".tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        unwrapped.save_pretrained(tmp, save_function=accelerator.save)
        tokenizer.save_pretrained(tmp)
        threshold = meta["eval"].get("best_f1_thresh", 0.0) if meta.get("v2") else None
        (tmp / "bertqa.json").write_text(json.dumps({**meta, "no_answer_threshold": threshold}, indent=2) + "\n")
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    accelerator.wait_for_everyone()
