"""The `mmreduce` command: one entry point, sub-commands contributed by the folders that own them."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import sys

from .methods.base import _REGISTRY, list_methods

__all__ = ["build_parser", "main"]

# (module, what it adds); a module that is absent (an optional part not installed) simply adds nothing.
_SUBCOMMAND_MODULES = (
    "mmreduce.eval.latency",
    "mmreduce.eval.cli",
    "mmreduce.eval.tune",
    "mmreduce.eval.compare",
    "mmreduce.eval.testbed.train_tiny",
    "mmreduce.eval.testbed.train_seed_vlm",
    "mmreduce.tokenizers_visual.cli",
    "mmreduce.demo.cli",
)


def _methods_command(args: argparse.Namespace) -> int:
    for name in list_methods():
        cls = _REGISTRY[name]
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
    for module_name in _SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            if error.name and module_name.startswith(error.name):
                continue  # that part of mmreduce does not exist (yet)
            raise
        add = getattr(module, "add_subparser", None)
        if add is not None:
            add(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
