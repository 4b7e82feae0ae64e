"""Command-line plumbing shared by `scripts/` and `benchmarks/`: flags generated from `TrainConfig`, checked flag
types, logging for a terminal, and the library's errors turned into one line and an exit code.

Only the scripts import it (the library itself never parses arguments or configures logging).
"""

from __future__ import annotations

import argparse
import dataclasses
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


class _AboveTheBars(logging.StreamHandler):
    """Log lines written through tqdm, so they land above a progress bar instead of on its line."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm.auto import tqdm

        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # logging must never take the run down
            self.handleError(record)


def setup_logging() -> None:
    """Library messages to stderr above the progress bars; silence other libraries' chatter (load reports, hub and
    font-cache messages, per-file save lines, their own progress bars)."""
    handler = _AboveTheBars()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S"))
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)
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
finite_float = _checked(float, math.isfinite, "must be a finite number")
port_number = _checked(int, lambda v: 0 <= v <= 65535, "must be a port number, 0 to 65535")
# A dropout probability: at 1 every value would be dropped.
probability = _checked(float, lambda v: 0 <= v < 1, "must be in [0, 1)")


def writable_file(text: str) -> Path:
    """argparse type: a file to write at the end of a run; its folder is created and proved writable now, so a
    long run does not fail at its last step."""
    from bertqa.reporting import check_writable

    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{path} is a folder; give a file name")
    try:
        check_writable(path.parent)
    except OSError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return path


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help keeps the description's line breaks and shows each flag's default."""


def output_folder(requested: Path | None, default: Path, *, overwrite: bool, results: tuple[str, ...]) -> Path:
    """Where a script writes its results, checked writable before any work: `requested` (refused if it already
    holds results, unless `overwrite`), else `default`, or `default-2`, `default-3`, ... if that holds results."""
    from bertqa.reporting import check_writable

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


def _bool(text: str) -> bool:
    if text.lower() in {"1", "true", "yes", "on"}:
        return True
    if text.lower() in {"0", "false", "no", "off"}:
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


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
        help_text = f"{field.metadata['help']} (default: {field.default})"
        if base is bool:
            parser.add_argument(flag, type=_bool, metavar="BOOL", default=argparse.SUPPRESS, help=help_text)
        elif typing.get_origin(base) is tuple:
            parser.add_argument(flag, nargs="*", default=argparse.SUPPRESS, help=help_text)
        else:
            kind = _optional(base) if optional else base
            parser.add_argument(
                flag, type=kind, choices=field.metadata.get("choices"), default=argparse.SUPPRESS, help=help_text
            )


def config_parser(description: str | None) -> argparse.ArgumentParser:
    """A parser with --preset, --config and one flag per TrainConfig field (read back with `config_from_args`)."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), help="start from a named preset; flags override it")
    parser.add_argument("--config", type=Path, help="start from a saved config.json; flags override it")
    parser.add_argument(
        "--print-config", action="store_true", help="print the resolved config (preset, --config, flags) and exit"
    )
    add_config_flags(parser)
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
    or SIGTERM into what it did (`bertqa.interrupt.Interrupted`) and 128 + the signal's number."""
    from bertqa.interrupt import stop_with_launcher

    stop_with_launcher()
    try:
        sys.exit(main())
    except KeyboardInterrupt as err:
        from bertqa.interrupt import Interrupted

        if os.environ.get("RANK", "0") == "0":  # every process stopped alike: one line says so
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
        sys.exit(2)


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
