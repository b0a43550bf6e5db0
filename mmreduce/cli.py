"""The `mmreduce` command: one entry point, sub-commands contributed by the folders that own them.

Sub-commands are registered in one place, the `mmreduce.commands` entry-point group of pyproject.toml (name ->
`module:add_subparser`); each module is imported only when the parser is built, so `import mmreduce` never pulls
in eval, the demo, gradio or matplotlib. `methods` belongs to the core and is built in.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from importlib.metadata import entry_points

from .methods.base import list_methods, method_class

__all__ = ["COMMAND_GROUP", "build_parser", "main"]

COMMAND_GROUP = "mmreduce.commands"


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
    parser = argparse.ArgumentParser(prog="mmreduce", description="Spend fewer vision tokens in Hugging Face VLMs.")
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
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
