"""Sharing a saved model on the Hugging Face Hub: which files of a model folder go up (`files_to_push`), and the push
itself through `huggingface_hub` (`create_repo`, then `upload_folder`), with the token from wherever the hub client
finds it (`HF_TOKEN`, or `hf auth login`).

Only a model folder is pushed: a whole model (`final_model/`, `best_model/`, any `save_pretrained` folder), a LoRA
run's `adapter/`, or an exported one. A training run's folder and its checkpoints are refused by name, as predict
refuses them. Before anything is sent it is checked, within seconds, that there is a token and that the hub answers;
either failing names the repository and what to do.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

__all__ = ["PushError", "Pushed", "check_repo_id", "files_to_push", "push_model"]

logger = logging.getLogger("bertqa")

# What a model folder may hold that is not the model: evaluation results (older versions wrote them inside), an
# interrupted save's leftovers, hidden files.
_RESULTS = "scores.json"
_CODE_LINE = re.compile(r'^MODEL = "[^"\n]*"', re.MULTILINE)  # how a card's code names the model (`bertqa.card`)


class PushError(OSError):
    """The model could not be pushed: no token, no hub, or the hub refused; the message says which and what to do."""


@dataclass(frozen=True)
class Pushed:
    """What a push did: the repository, the branch, the files sent and the commit's address."""

    repo_id: str
    revision: str
    files: tuple[str, ...]
    url: str


def files_to_push(folder: str | Path) -> list[str]:
    """The files of a model folder that a push sends, as paths inside it ("adapter/adapter_config.json"), sorted.
    Refuses what is not a model folder: a training run's, a checkpoint, a file, one without a model."""
    from bertqa.model import ADAPTER_CONFIG, check_model_folder

    path = Path(folder).expanduser()
    check_model_folder(str(folder))  # a run's folder or checkpoint, a file, a path that is not there
    if not path.is_dir():
        raise ValueError(f"{folder} is not a local folder: push a model folder a run or an export saved")
    if not any((path / name).is_file() for name in ("config.json", ADAPTER_CONFIG)):
        raise ValueError(
            f"{folder} holds no model (no config.json, nor {ADAPTER_CONFIG}): push a model folder such as "
            "runs/NAME/final_model, its adapter/, or an exported folder"
        )
    files, outside = [], []
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        parts = file.relative_to(path).parts
        if any(part.startswith(".") or part.endswith(".tmp") or part == "__pycache__" for part in parts):
            continue
        if any((path.joinpath(*parts[:k]) / _RESULTS).is_file() for k in range(1, len(parts))):
            continue  # an evaluation's results kept inside the model (at any depth): not the model
        if not file.resolve().is_relative_to(path.resolve()):
            outside.append("/".join(parts))  # a link out of the folder: what it points at is not the model's
            continue
        files.append("/".join(parts))
    if outside:
        logger.warning("%s: left out, links to files outside the folder: %s", folder, ", ".join(outside))
    return files


def push_model(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    message: str | None = None,
    token: str | None = None,
) -> Pushed:
    """Push a model folder to the Hub repository `repo_id` (made if missing; `private` for a new one), on the
    branch `revision` (made from main if missing; default main), in one commit. The model card's code is pointed
    at `repo_id` in what is sent; the folder itself is left as it is."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    check_repo_id(repo_id)
    files = files_to_push(folder)
    api = HfApi(token=token)
    _check_reachable(api, repo_id)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision is not None:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        with _staged(Path(folder).expanduser(), files, repo_id) as stage:
            commit = api.upload_folder(
                folder_path=stage,
                repo_id=repo_id,
                revision=revision,
                commit_message=message or f"Upload {Path(folder).name} with bertqa",
            )
    except HfHubHTTPError as err:
        raise PushError(f"the hub refused the push to {repo_id}: {_said(err)}") from None
    return Pushed(repo_id, revision or "main", tuple(files), str(commit.commit_url))


def check_repo_id(repo_id: str) -> None:
    """Refuse, before anything is sent, a repository id the Hub would refuse: NAME or ORG/NAME, of letters, digits,
    "-", "_" and "." (not "--" or ".." inside, nor "-" or "." at either end), at most 96 characters."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise ValueError(f"{repo_id!r} is not a Hub repository id: {' '.join(str(err).split())}") from None


def _check_reachable(api: object, repo_id: str) -> None:
    """Fail within seconds, naming `repo_id`, where there is no token or no hub to push to."""
    from huggingface_hub import get_token

    from bertqa.hub import endpoint_unreachable

    if getattr(api, "token", None) is None and get_token() is None:
        raise PushError(
            f"cannot push to {repo_id}: no Hugging Face token found. Log in with `hf auth login`, or set HF_TOKEN "
            "to a token with write access (https://huggingface.co/settings/tokens)"
        )
    # The hub client's own offline switches (the datasets one does not stop a push)
    switch = next((name for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE") if _on(name)), None)
    reason = f"{switch}={os.environ[switch]} is set" if switch else endpoint_unreachable()
    if reason is not None:
        raise PushError(f"cannot push to {repo_id}: the hub cannot be used here ({reason}); push where it can")


def _on(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE")


def _said(err: Exception) -> str:
    """The hub's answer in one line, with what to do for the usual refusals."""
    status = getattr(getattr(err, "response", None), "status_code", None)
    hint = {
        401: "the token was not accepted: log in again (`hf auth login`) or check HF_TOKEN",
        403: "the token may not write there: use a token with write access, or a repository of your own",
    }.get(status or 0, "")
    line = " ".join(str(err).split())[:300]
    return f"{line}{'; ' + hint if hint else ''}"


@contextmanager
def _staged(folder: Path, files: list[str], repo_id: str) -> Iterator[Path]:
    """A temporary folder holding `files` (links to the originals) with the model card's code pointed at
    `repo_id`: what is uploaded, leaving the model folder untouched."""
    with tempfile.TemporaryDirectory(prefix="bertqa-push-") as tmp:
        stage = Path(tmp)
        for name in files:
            target = stage / name
            target.parent.mkdir(parents=True, exist_ok=True)
            if name == "README.md":  # the card of the folder pushed (an adapter/ inside keeps its own)
                text = (folder / name).read_text(encoding="utf-8")
                target.write_text(_CODE_LINE.sub(f'MODEL = "{repo_id}"', text), encoding="utf-8")
                continue
            try:
                target.symlink_to((folder / name).resolve())
            except OSError:  # a file system without links: a copy
                shutil.copy2(folder / name, target)
        yield stage
