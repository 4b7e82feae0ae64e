"""Checkpoint folders that a crash cannot corrupt, and that are checked before they are trusted.

`accelerator.save_state` writes into `step_XXXXXXXX.tmp`; then the run's config and a manifest (every file's size and
SHA-256) are written, last, and the folder is renamed to `step_XXXXXXXX` once every process has finished. A kill
during a save leaves a `.tmp` folder that is ignored and later removed. Resuming from "latest" verifies the newest
checkpoint against its manifest and falls back to the newest intact one, with a warning; pruning keeps the newest
intact checkpoints and removes damaged ones, so it never removes the last good one. Saved models (`best_model/`,
`final_model/`) are replaced the same way.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bertqa.adapters import ADAPTER_DIR, is_lora, merged
from bertqa.card import write_card
from bertqa.config import computation_changes, kept_on_resume
from bertqa.postprocess import NO_CALIBRATION
from bertqa.sources import DEFAULT_NO_ANSWER_THRESHOLD
from bertqa.training.reporting import check_writable, read_json
from bertqa.training.runtime import sharding

if TYPE_CHECKING:
    from accelerate import Accelerator

    from bertqa.data import Window
    from bertqa.sources import RunExamples

__all__ = [
    "RUN_RECORDS",
    "checkpoint_dir",
    "clear_earlier_run",
    "disk_cost",
    "has_optimizer_state",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "model_meta",
    "resolve_resume",
    "resume_point",
    "save_checkpoint",
    "save_model",
    "saved_config",
    "verify",
]

logger = logging.getLogger("bertqa")
_NAME = re.compile(r"^step_(\d{8})$")
MANIFEST, CONFIG = "manifest.json", "config.json"
# What a run leaves in its output folder besides checkpoints: a fresh run there would replace them.
RUN_RECORDS = ("final_model", "best_model", "metrics.jsonl", "train_log.jsonl", "config.json", "training_curves.png")


def checkpoint_dir(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / "checkpoints" / f"step_{step:08d}"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete (renamed) checkpoint folders, oldest first; whether they are intact is `verify`'s question."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _NAME.match(p.name)]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))  # type: ignore[union-attr]


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint folder (not verified), or None."""
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def verify(folder: Path, *, hashes: bool = True) -> str | None:
    """None if `folder` matches its manifest (sizes, and SHA-256 when `hashes`), else what is wrong with it."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError) as err:
        return f"no readable {MANIFEST} ({err.__class__.__name__})"
    for name, entry in manifest.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != entry["size"]:
            return f"{name} has {path.stat().st_size} bytes, the manifest says {entry['size']}"
        if hashes and _sha256(path) != entry["sha256"]:
            return f"{name} does not match its SHA-256"
    return None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def resolve_resume(
    resume: str | None, output_dir: str | Path, *, overwrite: bool = False, clear: bool = True
) -> Path | None:
    """The checkpoint to resume from: None (start afresh), the newest intact one for "latest", or a given folder.

    Starting afresh where an earlier run left checkpoints or records is refused unless `overwrite`: it would mix two
    runs, or replace a finished one without being asked. With `overwrite` they are removed now, or, with
    `clear=False`, left for `clear_earlier_run` once every other setting has been checked.
    """
    out = Path(output_dir)
    if resume is not None and resume != "latest":
        path = Path(resume)
        if not path.is_dir():
            raise FileNotFoundError(f"checkpoint to resume from does not exist: {path}")
        problem = verify(path) if (path / MANIFEST).exists() else None
        if problem:
            raise ValueError(f"checkpoint {path} is damaged ({problem}); resume from another one or 'latest'")
        return path
    if resume == "latest":
        for folder in reversed(list_checkpoints(out)):
            problem = verify(folder) if (folder / MANIFEST).exists() else None
            if problem is None:
                return folder
            logger.warning("checkpoint %s is damaged (%s): trying the one before it", folder, problem)
    _refuse_or_clear(out, overwrite=overwrite, resuming=resume == "latest", clear=clear)
    return None


def clear_earlier_run(output_dir: str | Path) -> None:
    """Remove an earlier run's checkpoints and records from `output_dir` (asked for with `overwrite`)."""
    _refuse_or_clear(Path(output_dir), overwrite=True, resuming=False)


def _refuse_or_clear(out: Path, *, overwrite: bool, resuming: bool, clear: bool = True) -> None:
    """A fresh start in `out`: refuse when an earlier run's checkpoints or records are there, or clear them."""
    found = [name for name in RUN_RECORDS if (out / name).exists()]
    found += ["checkpoints/"] if list_checkpoints(out) else []
    if not found:
        return
    if not overwrite:
        hint = "no intact checkpoint is left to resume from; " if resuming else ""
        resume = "" if resuming or not list_checkpoints(out) else "resume it with --resume latest, "
        raise ValueError(
            f"{out} holds an earlier run ({', '.join(found)}); {hint}{resume}choose another output_dir, or pass "
            "--overwrite true to replace it"
        )
    if not clear:
        return
    logger.warning("--overwrite: removing the earlier run's %s from %s", ", ".join(found), out)
    for name in [*RUN_RECORDS, "checkpoints"]:
        path = out / name
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)


def saved_config(checkpoint: Path) -> dict[str, Any] | None:
    """The run config saved in a checkpoint (None for checkpoints written before configs were saved in them)."""
    path = checkpoint / CONFIG
    return json.loads(path.read_text()) if path.is_file() else None


def save_checkpoint(
    accelerator: Accelerator,
    output_dir: str | Path,
    step: int,
    *,
    keep: int,
    config: dict[str, Any] | None = None,
    optimizer_state: bool = True,
    replace: bool = False,
) -> Path:
    """Save the full training state (model, optimizer, registered objects, RNG) atomically, with the run config and
    a manifest; then keep the newest `keep` intact checkpoints and remove the rest. Without `optimizer_state` the
    optimizer is left out (a third of the size for AdamW; a resume from it starts the optimizer afresh). An intact
    checkpoint of the same update is kept as it is, unless `replace` (the state changed since: a stop)."""
    final = checkpoint_dir(output_dir, step)
    if not replace and final.is_dir() and verify(final, hashes=False) is None:
        return final  # this update is already saved (e.g. a periodic save that fell on an epoch end)
    tmp = final.with_name(final.name + ".tmp")
    previous = latest_checkpoint(output_dir)
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.parent.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    # Each step ends with every process saying whether its part was written (in place of a barrier), so a
    # process whose write failed stops all of them at the same point instead of leaving them waiting.
    with _optimizers(accelerator, keep=optimizer_state):
        failed = _attempt(lambda: accelerator.save_state(str(tmp)))
    if _agree(accelerator, failed) and accelerator.is_main_process:
        failed = failed or _attempt(lambda: _seal(tmp, config))
        if failed is None:
            shutil.rmtree(final, ignore_errors=True)  # a damaged folder of the same step
            os.replace(tmp, final)
            _prune(Path(output_dir), keep=keep)
    if not _agree(accelerator, failed):
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        needed = _folder_bytes(previous) if previous is not None else _state_bytes(accelerator)
        kept = f"{previous} is intact and stays the latest" if previous else "no earlier checkpoint was saved"
        raise _write_failed("checkpoint", final, failed, needed=needed, kept=kept)
    return final


@contextlib.contextmanager
def _optimizers(accelerator: Accelerator, *, keep: bool) -> Iterator[None]:
    """Accelerate saves and loads every prepared optimizer; one left out of a checkpoint is hidden from it meanwhile
    (Accelerate has no option for this)."""
    if keep:
        yield
        return
    hidden, accelerator._optimizers = accelerator._optimizers, []
    try:
        yield
    finally:
        accelerator._optimizers = hidden


def has_optimizer_state(folder: Path) -> bool:
    """Whether a checkpoint holds the optimizer (`save_optimizer_state`)."""
    return any(folder.glob("optimizer*.bin")) or any(folder.glob("optimizer*.safetensors"))


def disk_cost(model: Any, *, keep: int, optimizer_state: bool, save_model: bool) -> str:
    """What a run's checkpoints and saved models will take on disk, in words, from the model's size (the plan line)."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    trained = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    each = weights + 2 * trained if optimizer_state else weights  # AdamW keeps two moments of what trains
    what = "weights + optimizer state" if optimizer_state else "weights only, no optimizer state"
    line = f"checkpoints about {_size(each)} each ({what}), the newest {keep} kept"
    total = keep * each
    if save_model:
        line += f"; best_model/ and final_model/ {_size(weights)} each"
        total += 2 * weights
    return f"{line}: about {_size(total)} in all (keep_checkpoints, save_optimizer_state, save_model)"


def _attempt(write: Any) -> BaseException | None:
    """Run `write`; return what made it fail for want of space or permission (None: it was written)."""
    try:
        write()
    except (OSError, RuntimeError) as err:  # torch reports a full disk as RuntimeError ("file write failed")
        return err
    except Exception as err:
        if type(err).__name__ != "SafetensorError":  # safetensors reports one with its own type
            raise
        return err
    return None


def _agree(accelerator: Accelerator, failed: BaseException | None) -> bool:
    """True when every process's write succeeded (a collective with several processes)."""
    if accelerator.num_processes == 1:
        return failed is None
    import torch

    flags = accelerator.gather(torch.tensor([failed is not None], device=accelerator.device))
    return not bool(flags.any())


def _write_failed(kind: str, folder: Path, err: BaseException | None, *, needed: int, kept: str) -> OSError:
    """One line for a save that failed: the path, why, the space it needs against what is free, what is left."""
    free = shutil.disk_usage(next(p for p in (folder, *folder.parents) if p.exists())).free
    cause = str(err).strip().splitlines()[0][:300] if err is not None else "another process could not write its part"
    return OSError(
        f"could not write {kind} {folder}: {cause}. It needs about {_size(needed)} and {_size(free)} are free there "
        f"(or a quota or file-size limit stops it); the partial folder was removed and {kept}. Free some space, then "
        "run the same command again (with --resume latest for a run)"
    )


def _size(count: int) -> str:
    return f"{count / 2**20:,.1f} MiB"


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _state_bytes(accelerator: Accelerator) -> int:
    """What a first checkpoint will hold, roughly: the weights and twice as much optimizer state (AdamW's two
    moments)."""
    models = getattr(accelerator, "_models", [])
    return 3 * sum(p.numel() * p.element_size() for m in models for p in m.parameters())


def _seal(folder: Path, config: dict[str, Any] | None) -> None:
    if config is not None:
        (folder / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    manifest = {str(p.relative_to(folder)): {"size": p.stat().st_size, "sha256": _sha256(p)} for p in files}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")


def _prune(output_dir: Path, *, keep: int) -> None:
    """Keep the newest `keep` checkpoints that match their manifest (sizes); remove older and damaged ones."""
    kept = 0
    for folder in reversed(list_checkpoints(output_dir)):
        # Checkpoints from before manifests cannot be checked: they count as intact.
        intact = not (folder / MANIFEST).exists() or verify(folder, hashes=False) is None
        if intact and kept < keep:
            kept += 1
            continue
        shutil.rmtree(folder, ignore_errors=True)
    for stale in (output_dir / "checkpoints").glob("*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)


def model_meta(
    examples: RunExamples,
    *,
    window: Window,
    max_answer_length: int,
    column_map: str | None,
    eval_column_map: str | None = None,
    skip_bad_records: bool = False,
) -> dict[str, Any]:
    """What `bertqa.json` beside a saved model says about its training run: the window settings, whether it is a
    SQuAD v2 model, the evaluation data and how `evaluate.py` reads it again (column maps: the training data's, and
    the evaluation data's, which is the training one's unless it has its own; whether bad records were skipped),
    and for v2 where its no-answer threshold is chosen."""
    meta = {**window.to_dict(), "max_answer_length": max_answer_length, "v2": examples.v2}
    meta["eval_data"] = examples.eval_data  # None: examples passed in cannot be named again
    meta["eval_rule"] = examples.eval_rule  # a held-out share: how `evaluate.py` draws the same questions again
    if examples.eval_rule is not None:  # said in words; the rule is what finds the questions again
        meta["eval_data"] = held_out_words(examples)
    meta["column_map"] = column_map
    meta["eval_column_map"] = column_map if eval_column_map is None else eval_column_map
    meta["skip_bad_records"] = skip_bad_records
    if examples.v2 and examples.calibration_off is not None:
        meta["threshold_calibrated_on"] = {
            "source": f"none ({examples.calibration_off}): the default threshold {DEFAULT_NO_ANSWER_THRESHOLD:g}",
            "questions": 0,
        }
    elif examples.v2:
        on = examples.calibration
        where = f"{examples.calibration_split:.0%} of the training data, held out by article (or passage)"
        meta["threshold_calibrated_on"] = {
            "source": where if on else "the evaluation data (optimistic)",
            "questions": len(on or examples.eval),
        }
    return meta


def held_out_words(examples: RunExamples) -> str:
    """A held-out evaluation share in words: "dev-v1.1: 2,153 of the training questions held out (20%; 20% asked),
    seed 42; 24 of them scored"."""
    said = f"{examples.train_data}: {examples.eval_described}, seed {(examples.eval_rule or {}).get('seed')}"
    scored = f"{len(examples.eval):,}"
    # The description counts the share as held out; max_eval_examples may score fewer of them
    return said if examples.eval_described.startswith(f"{scored} ") else f"{said}; {scored} of them scored"


def save_model(accelerator: Accelerator, model: Any, tokenizer: Any, path: Path, meta: dict[str, Any]) -> None:
    """save_pretrained model + tokenizer (loadable with plain transformers) and bertqa.json with the settings used.

    For v2 models `no_answer_threshold` is the threshold chosen on held-out training questions (see
    `threshold_calibrated_on` in `meta`), or, without them, the best one on the evaluation data.
    """
    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(model)
    # A sharded model (FSDP, DeepSpeed) is gathered whole by every process together; the others' is whole already.
    whole = accelerator.get_state_dict(model) if sharding(accelerator) else None
    tmp = path.with_name(path.name + ".tmp")
    failed = None
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        record = meta["eval"]
        threshold = record.get("no_answer_threshold", record.get("best_f1_thresh", 0.0)) if meta.get("v2") else None
        # The calibration chosen with the threshold (v2); none where the record has none.
        calibration = {name: record.get(name, default) for name, default in NO_CALIBRATION.to_settings().items()}
        settings = {**meta, "no_answer_threshold": threshold, **calibration}

        def write() -> None:
            if is_lora(unwrapped):  # the adapter alone, and the plain model with it merged in
                adapter = (tmp / ADAPTER_DIR, path / ADAPTER_DIR)
                _write_model(unwrapped, tokenizer, adapter, settings, save=accelerator.save, kind="adapter")
                _write_model(merged(unwrapped), tokenizer, (tmp, path), settings, save=accelerator.save)
            else:
                _write_model(unwrapped, tokenizer, (tmp, path), settings, save=accelerator.save, state_dict=whole)

        failed = _attempt(write)
        if failed is None:
            shutil.rmtree(path, ignore_errors=True)
            os.replace(tmp, path)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    if not _agree(accelerator, failed):  # every process stops alike when the main one could not write
        needed = sum(p.numel() * p.element_size() for p in unwrapped.parameters())
        kept = f"the earlier {path} is unchanged" if path.exists() else f"no {path.name} was saved"
        raise _write_failed("model", path, failed, needed=needed, kept=kept)


def _write_model(
    model: Any,
    tokenizer: Any,
    folders: tuple[Path, Path],
    settings: dict[str, Any],
    *,
    save: Any,
    state_dict: Any = None,
    kind: str = "model",
) -> None:
    """The model, its tokenizer, `bertqa.json` and its card into `folders[0]`, which becomes `folders[1]` (the
    name the card's code loads it by). The card is written last: peft writes a README.md of its own."""
    folder, final = folders
    model.save_pretrained(folder, save_function=save, state_dict=state_dict)
    tokenizer.save_pretrained(folder)
    (folder / "bertqa.json").write_text(json.dumps(settings, indent=2) + "\n")
    write_card(folder, settings, kind=kind, ref=str(final))


def resume_point(
    output_dir: str | Path, settings: dict[str, Any], *, resume: str | None, overwrite: bool, accept_changes: bool
) -> tuple[Path | None, dict[str, Any]]:
    """Before any work: the output folder is writable, the checkpoint to resume from (if any) is intact, and resuming
    does not silently change the computation (nor change what cannot change: `kept_on_resume`). `settings` is the
    run's config (`TrainConfig.to_dict()`). Returns the checkpoint (None: a fresh start) and the config record to
    save, with the changes accepted on resume."""
    out = Path(output_dir)
    check_writable(out)
    resume_from = resolve_resume(resume, out, overwrite=overwrite, clear=False)  # fit clears once all is checked
    if resume_from is None:
        return None, settings
    saved = saved_config(resume_from) or read_json(out / "config.json") or {}
    if (refused := kept_on_resume(saved, settings)) is not None:  # said before any change is listed
        raise ValueError(f"{resume_from}: {refused}")
    history = list(saved.get("_changes", []))
    changes = computation_changes(saved, settings)
    if changes:
        listed = "; ".join(f"{name}: {old!r} -> {new!r}" for name, (old, new) in changes.items())
        if not accept_changes:
            raise ValueError(
                f"resuming {resume_from} with settings that change the computation ({listed}). Use the checkpoint's "
                "settings, start in another output_dir, or pass --accept-changes true to go on with the new ones"
            )
        logger.warning("resuming %s with changed settings, accepted: %s", resume_from, listed)
        history.append({"checkpoint": resume_from.name, "changes": {k: list(v) for k, v in changes.items()}})
    return resume_from, {**settings, "_changes": history} if history else settings


def load_checkpoint(accelerator: Accelerator, folder: Path) -> None:
    """`Accelerator.load_state`, with a clear error for an optimizer whose parameter groups changed. A checkpoint
    saved without the optimizer state restores everything else; the optimizer starts afresh (said)."""
    optimizer_state = has_optimizer_state(folder) or not accelerator._optimizers
    if not optimizer_state:
        logger.warning(
            "%s holds no optimizer state (save_optimizer_state was off): the optimizer starts afresh, so "
            "the run does not continue exactly as it would have",
            folder,
        )
    try:
        with _optimizers(accelerator, keep=optimizer_state):
            accelerator.load_state(str(folder))
    except RuntimeError as err:
        if "state_dict" not in str(err):
            raise
        raise ValueError(
            f"{folder}: its model has other weights than this run's (the model, or lora_targets, changed); resume "
            "with the checkpoint's settings, or start afresh in another output_dir"
        ) from err
    except ValueError as err:
        if "parameter groups" not in str(err):
            raise
        raise ValueError(
            f"{folder}: its optimizer has other parameter groups than this run's (layer_lr_decay or the optimizer "
            "changed); resume with the checkpoint's, or start afresh in another output_dir"
        ) from err
