"""The `mmreduce` command: one entry point, sub-commands contributed by the folders that own them.

Sub-commands are registered in one place, the `mmreduce.commands` entry-point group of pyproject.toml (name ->
`module:add_subparser`); each module is imported only when the parser is built, so `import mmreduce` never pulls
in eval, the demo, gradio or matplotlib. `methods` belongs to the core and is built in.

One error path: whatever the user got wrong (a bad option, SPEC, path or value: argparse errors, `ValueError`,
`TypeError`, `OSError`) prints one line, `mmreduce <command>: <what is wrong and how to fix it>`, and exits with
status 2; an interrupted run says how to resume and exits with 130; anything else is an internal error, printed as
one line that says where to look, exit status 1. `--debug` (or MMREDUCE_DEBUG=1) shows the traceback instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import traceback
from importlib.metadata import entry_points

from .methods.base import list_methods, method_class

__all__ = ["COMMAND_GROUP", "build_parser", "main"]

COMMAND_GROUP = "mmreduce.commands"
DEBUG_ENV = "MMREDUCE_DEBUG"
#: Exceptions that mean the user's input is wrong (their message names what and how to fix it).
USER_ERRORS = (ValueError, TypeError, OSError)


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (the usage is one `--help` away); sub-parsers inherit the class."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def _methods_command(args: argparse.Namespace) -> int:
    for name in list_methods():
        cls = method_class(name)
        fields = ", ".join(
            f"{f.name}={f.default!r}" for f in dataclasses.fields(cls) if f.init and not f.name.startswith("_")
        )
        summary = (cls.__doc__ or "").strip().splitlines()[0]
        print(f"{name:10s} {cls.__name__}({fields})\n{'':10s} {summary}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mmreduce", description="Spend fewer vision tokens in Hugging Face VLMs.")
    parser.add_argument("--debug", action="store_true",
                        help=f"show the full traceback of an error (or set {DEBUG_ENV}=1)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    methods = subparsers.add_parser("methods", help="list the registered reduction methods and their fields")
    methods.set_defaults(func=_methods_command)
    for entry in sorted(entry_points(group=COMMAND_GROUP), key=lambda e: e.name):
        try:
            add_subparser = entry.load()
        except ImportError as error:  # an optional part whose dependencies are not installed
            _add_unavailable(subparsers, entry.name, error)
            continue
        add_subparser(subparsers)
    return parser


def _add_unavailable(subparsers, name: str, error: ImportError) -> None:
    """A placeholder command that says why `name` cannot run, instead of breaking every other command."""
    parser = subparsers.add_parser(name, help=f"(unavailable: {error})", add_help=False)
    parser.add_argument("rest", nargs=argparse.REMAINDER)

    def explain(args: argparse.Namespace) -> int:
        print(f"mmreduce {name} is unavailable: {error} (install the extra it needs, e.g. `make setup`)",
              file=sys.stderr)
        return 2

    parser.set_defaults(func=explain)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    debug = args.debug or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    where = f"mmreduce {args.command}"
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{where}: interrupted; run the same command again to continue (finished batches are kept)",
              file=sys.stderr)
        return 130
    except SystemExit as stop:
        if debug or not isinstance(stop.code, str):
            raise
        return _fail(where, stop.code, 2)
    except USER_ERRORS as error:
        if debug:
            raise
        return _fail(where, _one_line(error), 2)
    except Exception as error:  # noqa: BLE001 - one line instead of a traceback; --debug shows it
        if debug:
            raise
        frame = traceback.extract_tb(error.__traceback__)[-1]
        return _fail(where, f"internal error {type(error).__name__}: {_one_line(error)} (at {frame.filename}:"
                            f"{frame.lineno}; rerun with --debug for the traceback and report it)", 1)


def _one_line(error: BaseException) -> str:
    """The error's message on one line (a FileNotFoundError without one names its file)."""
    text = " ".join(str(error).split()) or type(error).__name__
    filename = getattr(error, "filename", None)
    if isinstance(error, OSError) and filename and str(filename) not in text:
        text = f"{text}: {filename}"
    return text


def _fail(where: str, message: str, status: int) -> int:
    print(f"{where}: {message}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
