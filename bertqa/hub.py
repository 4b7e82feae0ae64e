"""Whether the Hugging Face hub can be used, found out in seconds: a model or dataset id that is neither a local
folder nor cached would otherwise be retried for about a minute before failing (offline, firewalled, no DNS).
"""

from __future__ import annotations

import functools
import os

__all__ = ["PROBE_TIMEOUT_S", "endpoint_unreachable", "hub_file", "hub_unreachable", "offline_setting"]

PROBE_TIMEOUT_S = 5.0  # long enough for a slow but working connection, short against a minute of retries
_OFFLINE_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")


def offline_setting() -> str | None:
    """The environment setting that keeps Hugging Face libraries off the network ("HF_HUB_OFFLINE=1"), if any:
    they then read their caches only, and fail at once on anything not there."""
    for name in _OFFLINE_ENV:
        if os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE"):
            return f"{name}={os.environ[name]}"
    return None


@functools.lru_cache(maxsize=1)  # one answer per process: the model, tokenizer and data ask in turn
def hub_unreachable() -> str | None:
    """Why the hub cannot be used here ("HF_HUB_OFFLINE=1 is set", "https://huggingface.co cannot be reached:
    ..."), or None when it answered."""
    setting = offline_setting()
    if setting is not None:
        return f"{setting} is set"
    return endpoint_unreachable()


def endpoint_unreachable() -> str | None:
    """Why the hub's endpoint (HF_ENDPOINT, else https://huggingface.co) does not answer, or None when it does."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    try:
        get_session().head(constants.ENDPOINT, timeout=PROBE_TIMEOUT_S)  # any answer, even an error page, will do
    except Exception as err:  # the HTTP client's own error types differ between huggingface_hub versions
        return f"{constants.ENDPOINT} cannot be reached ({type(err).__name__}: {str(err)[:120]})"
    return None


def hub_file(repo_id: str, filename: str) -> str | None:
    """The local path of a file of a hub model repository: from the hub's cache, else downloaded where the hub can
    be reached; None where it is in neither, or the repository has no such file."""
    from huggingface_hub import hf_hub_download

    for cached_only in (True, False):
        if not cached_only and hub_unreachable() is not None:
            return None
        try:
            return hf_hub_download(repo_id, filename, local_files_only=cached_only)
        except Exception:  # not cached, or not there: the hub client's error types vary between versions
            continue
    return None
