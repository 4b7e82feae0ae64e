"""LoRA adapters through peft: which linear layers of a model family take them (`lora_targets`), a QA model
wrapped to train them with the base frozen and the QA head trained in full (`add_lora`), how much of it trains
(`describe_trainable`), the plain model with the adapters merged in (`merged`, what a run saves as its models), an
adapter folder put back on its base (`load_adapter`), and either kind of folder loaded to answer with
(`load_trained`).

peft is an optional extra (`pip install -e ".[lora]"`), imported only by the functions that need it, so a run
without adapters never imports it.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from bertqa.model import ADAPTER_CONFIG, build_model, is_adapter_folder, model_depth, quiet_transformers

__all__ = [
    "ADAPTER_DIR",
    "DEFAULT_TARGETS",
    "add_lora",
    "describe_trainable",
    "is_adapter_folder",
    "is_lora",
    "load_adapter",
    "load_trained",
    "lora_targets",
    "merged",
]

logger = logging.getLogger("bertqa")

EXTRA = 'pip install -e ".[lora]" (peft)'
# Where a saved model of a LoRA run keeps the adapter alone (peft's adapter_config.json and weights, the QA head with
# them), with the tokenizer and bertqa.json, so the folder answers by itself once its base is found.
ADAPTER_DIR = "adapter"

# The attention projections of each family (model_type): what the adapters go on unless lora_targets names others.
DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(
        ("bert", "roberta", "xlm-roberta", "camembert", "electra", "albert", "megatron-bert", "roformer"),
        ("query", "key", "value"),
    ),
    "deberta-v2": ("query_proj", "key_proj", "value_proj"),
    "distilbert": ("q_lin", "k_lin", "v_lin"),
}


def _peft() -> Any:
    try:
        import peft
    except ImportError as err:
        raise ImportError(f"LoRA adapters (lora_r > 0) need peft: {EXTRA}") from err
    return peft


def lora_targets(model: torch.nn.Module, targets: Sequence[str] = ()) -> tuple[str, ...]:
    """The names of the linear layers that get adapters: `targets`, or the model family's attention projections;
    refused, with the names the model's linear layers have, when a name matches none of them."""
    linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
    kind = getattr(getattr(model, "config", None), "model_type", None)
    chosen = tuple(targets) or DEFAULT_TARGETS.get(kind or "")
    if not chosen:
        raise ValueError(
            f"lora_targets: bertqa has no default for {type(model).__name__} ({kind}); name the linear layers to "
            f"adapt, e.g. its attention projections (its linear layers are named {', '.join(linear)})"
        )
    missing = [name for name in chosen if name not in linear]
    if missing:
        raise ValueError(
            f"lora_targets {', '.join(missing)}: {type(model).__name__} has no linear layer of that name (its linear "
            f"layers are named {', '.join(linear)})"
        )
    if "qa_outputs" in chosen:
        raise ValueError("lora_targets: qa_outputs is the QA head, which LoRA runs train in full; leave it out")
    return chosen


def add_lora(
    model: torch.nn.Module, *, r: int, alpha: float | None, dropout: float, targets: Sequence[str] = ()
) -> torch.nn.Module:
    """`model` wrapped by peft for extractive QA: rank-`r` adapters on `targets` (`lora_targets`), scaled by
    alpha / r (alpha unset: 2r), every base weight frozen and the QA head (`qa_outputs`) trained in full."""
    peft = _peft()
    config = peft.LoraConfig(
        task_type=peft.TaskType.QUESTION_ANS,
        r=r,
        lora_alpha=2 * r if alpha is None else alpha,
        lora_dropout=dropout,
        target_modules=list(lora_targets(model, targets)),
    )
    with _quiet_peft():
        return peft.get_peft_model(model, config)


@contextlib.contextmanager
def _quiet_peft() -> Iterator[None]:
    """peft asks transformers about checkpointing by a name transformers 5 deprecates: a warning for peft's authors."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
        yield


def is_lora(model: torch.nn.Module) -> bool:
    """Whether `model` is wrapped by peft (with or without Accelerate's or torch's wrappers around it)."""
    inner = getattr(model, "module", model)
    return hasattr(inner, "peft_config") and hasattr(inner, "merge_and_unload")


def describe_trainable(model: torch.nn.Module) -> tuple[int, int]:
    """The trainable and all parameters' counts of a model as it trains (a peft model counts each parameter once:
    the QA head's trained copy, not also the frozen original peft keeps beside it)."""
    counts = [(p.numel(), p.requires_grad) for n, p in model.named_parameters() if ".original_module." not in n]
    return sum(n for n, trains in counts if trains), sum(n for n, _ in counts)


def merged(model: torch.nn.Module) -> torch.nn.Module:
    """A plain transformers model with the adapters' updates added into its weights (peft's `merge_and_unload` of a
    copy: the model being trained keeps its adapters). What `save_pretrained` writes of it loads anywhere."""
    return copy.deepcopy(model).merge_and_unload()


def base_of(folder: str | Path) -> dict[str, Any]:
    """What an adapter folder says of its base: the model's name (`base_model`; peft's record of the path it was
    loaded from when bertqa.json has none), the encoder layers a smaller student kept (`num_layers`, `layer_pick`),
    and how many encoder layers the trained model had (`depth`, None where unrecorded)."""
    folder = Path(folder).expanduser()
    saved = json.loads((folder / "bertqa.json").read_text()) if (folder / "bertqa.json").is_file() else {}
    peft_record = json.loads((folder / ADAPTER_CONFIG).read_text())
    return {
        "base_model": saved.get("base_model") or peft_record.get("base_model_name_or_path"),
        "num_layers": saved.get("num_layers"),
        "layer_pick": saved.get("layer_pick", "first"),
        "depth": saved.get("depth"),
    }


def load_adapter(folder: str | Path, *, base_model: str | None = None) -> torch.nn.Module:
    """The model an adapter folder was trained as: its base (`base_model`, else the one it names; shortened again
    to the layers a smaller student kept), the adapter put on it and merged in for answering. A base that cannot
    be the one it was trained on (the merged model it came with, another depth, weights the adapter has no place
    for) is refused."""
    folder = Path(folder).expanduser()
    base = base_of(folder)
    name = base_model or base["base_model"]
    if not name:
        raise ValueError(f"{folder} is a LoRA adapter that does not name its base model: pass its base model too")
    if base_model is not None:
        _check_given_base(folder, base_model, named=base["base_model"])
    logger.info("loading the adapter %s on its base model %s", folder, name)
    try:
        with quiet_transformers():  # the base's QA head is replaced by the adapter's: not a fresh one to train
            model = build_model(name, num_layers=base["num_layers"], layer_pick=base["layer_pick"])
    except (OSError, ValueError) as err:
        where = "given" if base_model is not None else f"named in {folder / 'bertqa.json'}"
        raise type(err)(f"the base model of the adapter {folder} ({name}, {where}): {err}; pass its base") from None
    depth = model_depth(model.config, name)
    if base["depth"] is not None and depth != base["depth"]:
        raise ValueError(
            f"the adapter {folder} was trained on a model of {base['depth']} encoder layers; its base {name} has "
            f"{depth}: pass the base it was trained on"
        )
    with _quiet_peft(), warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always", UserWarning)
        model = _peft().PeftModel.from_pretrained(model, str(folder))
    missing = [str(w.message) for w in said if "missing adapter keys" in str(w.message)]
    if missing:
        raise ValueError(f"the adapter {folder} does not fit its base {name}: {missing[0][:300]}")
    return model.merge_and_unload()


def _check_given_base(folder: Path, base_model: str, *, named: str | None) -> None:
    """Refuse the merged model an adapter was saved in as its base (the adapter would count twice); say so when
    the base given is not the one the adapter names."""
    given = Path(base_model).expanduser()
    if given.is_dir() and given.resolve() == folder.resolve().parent:
        raise ValueError(
            f"{base_model} is the model this adapter was merged into, not its base: it would be applied twice; "
            f"answer with {base_model} itself, or give the adapter's base ({named or 'unrecorded'})"
        )
    if named is not None and base_model != named:
        logger.warning("the adapter %s names the base %s; putting it on %s as asked", folder, named, base_model)


def load_trained(model_dir: str | Path, *, base_model: str | None = None) -> torch.nn.Module:
    """A trained QA model to answer with: a model folder, or an adapter folder put on its base (the one it names,
    or `base_model`)."""
    if is_adapter_folder(model_dir):
        return load_adapter(model_dir, base_model=base_model)
    if base_model is not None:
        raise ValueError(f"{model_dir} is a whole model, not a LoRA adapter: a base model is for adapter folders")
    return build_model(model_dir)
