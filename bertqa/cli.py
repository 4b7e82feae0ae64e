"""Command-line plumbing shared by `scripts/` and `benchmarks/`: the parser every script uses (`script_parser`: yes/no
flags bare or with a value, `--mixed-precision`, defaults in --help, a mistyped flag answered in two lines), flags
generated from `TrainConfig`, checked flag types, logging for a terminal, and the library's errors turned into one
line and an exit code (with a word on the traceback `accelerate launch` adds after it).

Only the scripts import it (the library itself never parses arguments or configures logging).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import logging
import math
import os
import sys
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bertqa.config import PRESETS, TrainConfig, load_config, preset


def setup_logging() -> None:
    """Library messages to stderr above the progress bars, from the main process of a launched run; silence other
    libraries' chatter (load reports, hub and font-cache messages, per-file save lines, their own progress bars)."""
    from bertqa.training.reporting import console_handler

    logging.basicConfig(level=logging.INFO, handlers=[console_handler()], force=True)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    for name in ("accelerate", "matplotlib", "datasets", "huggingface_hub", "filelock", "PIL", "httpx", "httpx2"):
        logging.getLogger(name).setLevel(logging.WARNING)


_KIND_NAMES: dict[Any, str] = {int: "a whole number", float: "a number"}


def _checked(kind: Callable[[str], Any], ok: Callable[[Any], bool], rule: str) -> Callable[[str], Any]:
    """An argparse type: `text` read as `kind`, refused with `rule` unless `ok` (argparse names the flag)."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {_KIND_NAMES.get(kind, 'a value')}, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"{rule}, got {value}")
        return value

    return parse


positive_int = _checked(int, lambda v: v > 0, "must be at least 1")
positive_float = _checked(float, lambda v: v > 0, "must be above 0")  # `not nan > 0`: nan is refused too
non_negative_float = _checked(float, lambda v: 0 <= v < float("inf"), "must be 0 or more")
non_negative_int = _checked(int, lambda v: v >= 0, "must be 0 or more")
share = _checked(float, lambda v: 0 <= v <= 1, "must be in [0, 1]")
finite_float = _checked(float, math.isfinite, "must be a finite number")
port_number = _checked(int, lambda v: 0 <= v <= 65535, "must be a port number, 0 to 65535")
# A dropout probability: at 1 every value would be dropped.
probability = _checked(float, lambda v: 0 <= v < 1, "must be in [0, 1)")


def writable_file(text: str) -> Path:
    """argparse type: a file to write at the end of a run; its folder is created and proved writable now, so a
    long run does not fail at its last step."""
    from bertqa.training.reporting import check_writable

    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{path} is a folder; give a file name")
    try:
        check_writable(path.parent)
    except OSError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return path


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help keeps the description's line breaks and shows each flag's default: appended unless the help text
    already says what the default is, or there is none to show (None: the help says what happens instead)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        shown = action.option_strings or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE)
        if not shown or "default" in text or action.default in (None, argparse.SUPPRESS, []):
            return text
        if isinstance(action.default, bool):  # as the flag takes it: --overwrite false
            return f"{text} (default: {str(action.default).lower()})"
        return text + " (default: %(default)s)"


def output_folder(requested: Path | None, default: Path, *, overwrite: bool, results: tuple[str, ...]) -> Path:
    """Where a script writes its results, checked writable before any work: `requested` (refused if it already
    holds results, unless `overwrite`), else `default`, or `default-2`, `default-3`, ... if that holds results."""
    from bertqa.training.reporting import check_writable

    def taken(folder: Path) -> bool:
        return any((folder / name).exists() for name in results)

    if requested is not None:
        if taken(requested) and not overwrite:
            raise ValueError(
                f"{requested} already holds results ({', '.join(results)}); pass --overwrite to replace them"
            )
        folder = requested
    else:
        folder, n = default, 1
        while taken(folder):
            n += 1
            folder = default.with_name(f"{default.name}-{n}")
    check_writable(folder)
    return folder


def precision_name(text: str) -> str:
    """A precision as Accelerate names it: `fp32`, which the logs say, is its `no`."""
    return "no" if text.lower() == "fp32" else text


_TRUE, _FALSE = frozenset({"1", "true", "yes", "on"}), frozenset({"0", "false", "no", "off"})


def _bool(text: str) -> bool:
    if text.lower() in _TRUE:
        return True
    if text.lower() in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected true/false (or yes/no, 1/0), got {text!r}")


class BoolFlag(argparse.Action):
    """A yes/no flag that every script spells alike: bare (`--overwrite`, true) or with a value (`--overwrite
    false`, also yes/no, 1/0). `negate=True` makes a `--no-X` spelling of the same setting (`--no-fuse` is
    `--fuse false`)."""

    def __init__(self, option_strings: list[str], dest: str, negate: bool = False, **kwargs: Any) -> None:
        kwargs.setdefault("metavar", "BOOL")
        super().__init__(option_strings, dest, nargs="?", const=True, type=_bool, **kwargs)
        self.negate = negate

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, value: Any, option: Any = None):
        setattr(namespace, self.dest, not value if self.negate else value)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


class ScriptParser(argparse.ArgumentParser):
    """The parser every script uses, so that all of them read alike: defaults shown in --help, yes/no flags bare
    or with a value (`BoolFlag`), `--mixed-precision` for precision, no abbreviated flags (a flag added later
    would change what an abbreviation means), and a mistyped flag answered in two lines, naming the flag and the
    nearest real one, instead of the whole usage."""

    def __init__(self, description: str | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(description=description, **kwargs)

    def add_flag(self, *names: str, help: str, default: Any = False, negate: bool = False, **kwargs: Any) -> Any:
        """A yes/no flag (`BoolFlag`)."""
        return self.add_argument(*names, action=BoolFlag, default=default, negate=negate, help=help, **kwargs)

    def add_data_flags(self, *, default: str | None, data_help: str, recorded: str | None = None) -> None:
        """The flags of a script that reads QA data, spelled and meaning alike in every one (train.py's come from
        `TrainConfig`: --train-data, --column-map, --skip-bad-records, --answerable-only, --max-train-examples).
        With `recorded` (what unset means), --column-map and --skip-bad-records default to how a model's run read
        its data (None: unset), and a value given wins."""
        self.add_argument("--data", default=default, help=data_help)
        unset = f" (default: {recorded})" if recorded else ""
        self.add_argument(
            "--column-map",
            help="your column names, e.g. 'context=passage,question=query,answer_text=gold' ('standard': the usual "
            f"ones){unset}",
        )
        self.add_flag(
            "--skip-bad-records",
            default=None if recorded else False,
            help=f"drop invalid records instead of stopping; how many is logged, the first few by file, line and "
            f"id{unset}",
        )
        self.add_flag("--answerable-only", help="use only questions that have an answer")
        self.add_argument("--max-examples", type=positive_int, help="a seeded random subset of this many questions")
        self.add_argument("--seed", type=int, default=42, help="seed of the subset")

    def add_base_model(self) -> None:
        """`--base-model`: the base a LoRA adapter folder goes on, where the one it names has moved."""
        self.add_argument(
            "--base-model",
            help="for a LoRA adapter folder (a run's final_model/adapter): the base model to put it on (default: "
            "the one the adapter names)",
        )

    def add_version(self, *, threshold_default: str) -> None:
        """`--v2` and `--threshold`: how a model answers where its `bertqa.json` does not say (a model bertqa did
        not train answers as SQuAD 1.1), or otherwise than it says. A threshold makes "no answer" possible, so it
        implies --v2 rather than being ignored on a SQuAD 1.1 model."""
        self.add_flag(
            "--v2",
            default=None,
            help="answer as a SQuAD 2.0 model, 'no answer' possible; --v2 false: always a span (default: as the "
            "model's bertqa.json says; a model without one answers as SQuAD 1.1)",
        )
        self.add_argument(
            "--threshold",
            type=finite_float,
            help="no-answer threshold: 'no answer' where the no-answer score (null score minus best span score) is "
            f"above it; implies --v2 (default: {threshold_default})",
        )

    def add_precision(self, *, choices: tuple[str, ...] = ("auto", "no", "bf16"), help: str) -> None:
        """`--mixed-precision` (train.py's name), and `--precision`, the name these scripts had first."""
        self.add_argument(
            "--mixed-precision",
            default="auto",
            choices=choices,
            type=precision_name,
            help=f"{help}; no = fp32 (fp32 is taken too); --precision is the same flag",
        )
        self.add_argument(
            "--precision", dest="mixed_precision", choices=choices, type=precision_name, help=argparse.SUPPRESS
        )

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        return super().parse_known_args(self._spelled_out(sys.argv[1:] if args is None else args), namespace)

    def _spelled_out(self, args: Any) -> list[str]:
        """`args` with each yes/no flag written as `--flag=VALUE`: a bare flag would otherwise take the word
        after it (`--overwrite runs/x/final_model`) as its value. Where the script takes no positional argument a
        bare flag is left bare, so that `--overwrite maybe` is refused as a bad value rather than as a stray word.
        A negative number in exponent form after a flag is joined to it too (`--threshold=-1e-3`): argparse would
        read it as a flag of its own."""
        args = [str(a) for a in args]
        actions = self._option_string_actions
        positionals = any(not a.option_strings for a in self._actions)
        out: list[str] = []
        i = 0
        while i < len(args):
            token = args[i]
            if token == "--":  # what follows is positional, whatever it looks like
                return out + args[i:]
            action, following = actions.get(token), args[i + 1] if i + 1 < len(args) else None
            if following is not None and (
                (isinstance(action, BoolFlag) and following.lower() in _TRUE | _FALSE)
                or (action is not None and action.nargs is None and following.startswith("-") and _is_number(following))
            ):
                out.append(f"{token}={following}")
                i += 2
                continue
            out.append(f"{token}=true" if isinstance(action, BoolFlag) and positionals else token)
            i += 1
        return out

    def parse_args(self, args: Any = None, namespace: Any = None) -> Any:
        args = list(sys.argv[1:] if args is None else args)
        # Before argparse parses: a mistyped flag is the error to report, not a positional it leaves missing.
        for token in args:
            if token == "--":
                break
            if self._unknown(token):
                self.error(self._unknown_message(token))
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            flag = next((t for t in extras if t.startswith("-") and not _is_number(t)), None)
            self.error(self._unknown_message(flag) if flag else f"unexpected argument: {' '.join(extras)}")
        return parsed

    def _unknown(self, token: str) -> bool:
        if not token.startswith("-") or token == "-" or " " in token or _is_number(token):
            return False  # a value (argparse reads a token with a space or a negative number as one too)
        known = self._option_string_actions
        # -q"Who?": a short flag with its value attached
        return token.split("=", 1)[0] not in known and (token.startswith("--") or token[:2] not in known)

    def _unknown_message(self, token: str) -> str:
        name = token.split("=", 1)[0]
        # max_steps for --max-steps is the commonest slip: compared as dashes, it is the closest by far
        near = difflib.get_close_matches(name.replace("_", "-"), list(self._option_string_actions), n=1, cutoff=0.6)
        return f"unknown flag {name}" + (f"; did you mean {near[0]}?" if near else "")

    def error(self, message: str) -> typing.NoReturn:
        """The message and where to look, not the whole usage (train.py's is 40 lines): exit code 2."""
        self.exit(2, f"{self.prog}: error: {message}\n{self.prog} --help lists every flag with its default\n")


def script_parser(description: str | None = None) -> ScriptParser:
    """A `ScriptParser` for a script whose module docstring is `description`."""
    return ScriptParser(description)


def _optional(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        if text.lower() in {"none", "null", ""}:
            return None
        try:
            return kind(text)
        except ValueError:
            name = _KIND_NAMES.get(kind, getattr(kind, "__name__", "a value"))
            raise argparse.ArgumentTypeError(f"expected {name} or none, got {text!r}") from None

    return parse


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One --flag per TrainConfig field, with its help text and default. A flag not given stays out of the parsed
    namespace, so only flags given on the command line override a preset, and `--eval-every-steps none` can clear a
    preset's value."""
    hints = typing.get_type_hints(TrainConfig)
    for field in dataclasses.fields(TrainConfig):
        hint = hints[field.name]
        args = typing.get_args(hint)
        optional = type(None) in args
        base = next((a for a in args if a is not type(None)), hint) if isinstance(hint, types.UnionType) else hint
        flag = "--" + field.name.replace("_", "-")
        help_text = f"{field.metadata['help']} (default: {field.default})".replace("%", "%%")  # argparse formats it
        if base is bool:
            parser.add_argument(flag, action=BoolFlag, default=argparse.SUPPRESS, help=help_text)
        elif typing.get_origin(base) is tuple:
            parser.add_argument(flag, nargs="*", default=argparse.SUPPRESS, help=help_text)
        else:
            kind = _optional(base) if optional else base
            kind = precision_name if field.name == "mixed_precision" else kind
            parser.add_argument(
                flag, type=kind, choices=field.metadata.get("choices"), default=argparse.SUPPRESS, help=help_text
            )


def config_parser(description: str | None) -> ScriptParser:
    """A parser with --preset, --config and one flag per TrainConfig field (read back with `config_from_args`)."""
    parser = script_parser(description)
    parser.add_argument("--preset", choices=sorted(PRESETS), help="start from a named preset; flags override it")
    parser.add_argument("--config", type=Path, help="start from a saved config.json; flags override it")
    parser.add_flag("--print-config", help="print the resolved config (preset, --config, flags) and exit")
    add_config_flags(parser)
    # The other scripts' first name for it, kept so that one spelling works everywhere.
    choices = TrainConfig.__dataclass_fields__["mixed_precision"].metadata["choices"]
    parser.add_argument(
        "--precision",
        dest="mixed_precision",
        choices=choices,
        type=precision_name,
        default=argparse.SUPPRESS,
        help=argparse.SUPPRESS,
    )
    presets = "\n".join(
        f"  {name}: " + ", ".join(f"{k}={v}" for k, v in changes.items()) for name, changes in PRESETS.items()
    )
    parser.epilog = (
        "The defaults shown are TrainConfig's own. A --preset or --config replaces some of them, and flags given on "
        "the command line override both; --print-config shows the result.\n\npresets:\n" + presets
    )
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The preset or saved config, with the flags given on the command line applied on top; with --print-config,
    print it as JSON and exit."""
    base = load_config(args.config) if args.config is not None else preset(args.preset)
    config = base.replace(**config_changes(args))
    if getattr(args, "print_config", False):
        sys.stdout.write(json.dumps(config.to_dict(), indent=2) + "\n")
        sys.exit(0)
    return config


def config_changes(args: argparse.Namespace) -> dict[str, Any]:
    """The TrainConfig fields given on the command line (None included: `--flag none`)."""
    changes = {}
    for field in dataclasses.fields(TrainConfig):
        if hasattr(args, field.name):
            value = getattr(args, field.name)
            changes[field.name] = tuple(value) if isinstance(value, list) else value
    return changes


def run(main: Callable[[], int]) -> None:
    """Run a script's main(); turn the library's clear errors into a one-line message and exit code 2, and Ctrl-C
    or SIGTERM into what it did (`bertqa.training.interrupt.Interrupted`) and 128 + the signal's number."""
    from bertqa.training.interrupt import stop_with_launcher
    from bertqa.training.reporting import process_rank

    stop_with_launcher()
    try:
        sys.exit(main())
    except KeyboardInterrupt as err:
        from bertqa.training.interrupt import Interrupted

        if process_rank() == 0:  # every process stopped alike: one line says so
            said = err.describe() if isinstance(err, Interrupted) else "stopped by Ctrl-C"
            sys.stderr.write(f"\n{said}\n")
        sys.exit(err.exit_code if isinstance(err, Interrupted) else 130)
    # ImportError: an optional extra that is not installed (the message names the pip command).
    except (ValueError, OSError, TypeError, FloatingPointError, RuntimeError, ImportError) as err:
        message = error_message(err)
        if message is None:
            raise
        logging.getLogger("bertqa").debug("error", exc_info=True)
        sys.stderr.write(f"error: {message}\n")
        note = launcher_note()
        if note is not None and process_rank() == 0:  # once, however many processes report
            sys.stderr.write(f"{note}\n")
        sys.exit(2)
    finally:
        close_process_group()


def close_process_group() -> None:
    """Shut down the process group of a launched run, if one is open. Left to the interpreter's exit, a gloo group
    aborts the process about half the time ("terminate called without an active exception": 10 of 24 two-process
    runs here, 0 of 24 after this), so a run that did its work, or stopped with a clear error, would end in SIGABRT.
    `fit` and the scripts let go of their DistributedDataParallel models first (`runtime.end_processes`)."""
    if "torch.distributed" not in sys.modules:  # never imported: nothing to close
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        import gc

        gc.collect()  # a DistributedDataParallel model left only in reference cycles goes first (see end_processes)
        try:
            dist.destroy_process_group()
        except Exception:  # the run's own outcome is what the exit says
            logging.getLogger("bertqa").debug("closing the process group failed", exc_info=True)


def launcher_note() -> str | None:
    """Under `accelerate launch`, a line to print after an error: the launcher follows a failed script with a
    traceback of its own, which reads like a second error but only reports the exit code."""
    if "ACCELERATE_MIXED_PRECISION" not in os.environ:  # not launched: no need to import torch to find out
        return None
    from bertqa.training.runtime import accelerate_launcher

    launcher = accelerate_launcher()
    if launcher == "simple":  # accelerate's own launcher: --quiet makes it exit with 1 instead of raising
        return (
            "(the CalledProcessError traceback accelerate launch prints next only reports this exit; "
            "accelerate launch --quiet leaves it out)"
        )
    if launcher == "torchrun":  # several processes: torch's agent reports, and --quiet does not change that
        return "(the ChildFailedError report accelerate launch prints next only repeats this exit)"
    return None


def error_message(err: BaseException) -> str | None:
    """One line for an error a person can act on; None for a bug, whose traceback is more use."""
    if isinstance(err, RuntimeError) and not isinstance(err, FloatingPointError):
        text = str(err)
        if "timed out" in text.lower() or "timeout" in text.lower():  # a collective gave up (gloo or NCCL)
            rank, world = os.environ.get("RANK", "0"), os.environ.get("WORLD_SIZE", "1")
            return (
                f"process {rank} of {world} gave up waiting for the others (--collective-timeout-s): another process "
                f"stalled, was stopped or died. {text.splitlines()[0][:300]}"
            )
        return None
    if isinstance(err, OSError) and err.filename is not None and err.strerror:
        return f"{err.filename}: {err.strerror}"
    return str(err)
