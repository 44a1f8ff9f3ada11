"""The one error type for what a user got wrong, and the CLI edge that reports it.

Every user-facing error of the package (a bad flag, a missing or corrupt file,
a config value out of range) is a ``UserError``: ``ConfigError``,
``CheckpointError``, ``DataError`` and the CLIs' own errors subclass it. Each
CLI's ``main`` goes through ``run_cli``, which prints ``error: <message>`` on
one line and exits with code 2; ``RADD_DEBUG=1`` (or ``--debug``) shows the
traceback instead. Every CLI reads its flags with ``ArgParser``, argparse that
raises instead of printing its usage, so a bad flag (unknown, missing value,
invalid choice) is that same one line; an on/off flag is a ``Switch``
(``--x`` / ``--no_x``, and argparse's ``--no-x``). Library errors (safetensors, json, zip)
are wrapped into a ``UserError`` naming the file where they are raised, never
passed through raw.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Sequence

USAGE_EXIT_CODE = 2


class UserError(ValueError):
    """Something the user can fix: the message names the problem and the file or flag at fault.

    A ValueError subclass, so code that catches ValueError (and the published API's callers)
    keeps working.
    """


class UsageError(UserError):
    """A flag that argparse refuses (unknown, missing value, invalid choice or type)."""


class NonFiniteLossError(UserError):
    """A loss (or the gradient norm, or the weights) became NaN / inf, in training or evaluation.

    Training stops at the step that saw it and saves nothing non-finite; evaluation reports no
    perplexity. A UserError (one ``error:`` line from the CLI): the fix is the user's, e.g. a lower
    ``optim.lr`` and a resume from the checkpoint the message names, or another checkpoint.
    """


class ArgParser(argparse.ArgumentParser):
    """argparse that raises ``error_type(message)`` instead of printing its usage and exiting.

    Every CLI's parser (sample.py, eval.py, train.py's Hydra flags) is one of these, so a bad flag
    is the one ``error: ...`` line and exit code 2 of ``run_cli``, as every other user error is.
    ``--help`` still prints the help and exits 0.
    """

    def __init__(self, *args, error_type: type[UserError] = UsageError, **kwargs):
        super().__init__(*args, **kwargs)
        self.error_type = error_type

    def error(self, message: str):
        raise self.error_type(message)


class Switch(argparse.Action):
    """An on/off flag: ``--name`` sets True, ``--no_name`` (the spelling the docs use) and ``--no-name``
    (argparse's ``BooleanOptionalAction`` spelling) set False; the default (None: decided later) otherwise.

    Example: ``parser.add_argument("--cuda_graphs", action=Switch, default=None, help=...)``.
    """

    def __init__(self, option_strings, dest, default=None, required=False, help=None):
        names = []
        for option in option_strings:
            names.append(option)
            if option.startswith("--"):
                names += [f"--no_{option[2:]}", f"--no-{option[2:]}"]
        super().__init__(names, dest, nargs=0, default=default, required=required, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, not option_string.startswith("--no"))

    def format_usage(self) -> str:
        return " | ".join(self.option_strings)


def debug_requested(argv: Sequence[str] | None = None) -> bool:
    """True when ``RADD_DEBUG=1`` is set or ``--debug`` is among the arguments."""
    args = sys.argv[1:] if argv is None else argv
    return os.environ.get("RADD_DEBUG", "0") not in ("", "0") or "--debug" in args


def strip_debug_flag(argv: Sequence[str] | None) -> list[str]:
    """The arguments without ``--debug`` (each CLI accepts it without declaring it)."""
    args = list(sys.argv[1:] if argv is None else argv)
    return [a for a in args if a != "--debug"]


def one_line(error: BaseException) -> str:
    """``error: <message>`` with the message folded onto one line."""
    text = " ".join(str(error).split()) or type(error).__name__
    return f"error: {text}"


def run_cli(main: Callable[[list[str]], int], argv: Sequence[str] | None = None) -> int:
    """Run ``main(args)`` and turn a ``UserError`` into one line on stderr and exit code 2.

    Anything else is a bug and keeps its traceback. ``KeyboardInterrupt`` exits with 130
    after one line, ``interrupted`` (``interrupted: <what was kept>`` when the interrupt carries
    that), so an interrupted run does not print a traceback either.
    """
    debug = debug_requested(argv)
    args = strip_debug_flag(argv)
    try:
        return main(args)
    except UserError as e:
        if debug:
            raise
        print(one_line(e), file=sys.stderr)
        return USAGE_EXIT_CODE
    except KeyboardInterrupt as e:
        if debug:
            raise
        detail = " ".join(str(e).split())
        print(f"interrupted: {detail}" if detail else "interrupted", file=sys.stderr)
        return 130
