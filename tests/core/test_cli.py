"""The `mmreduce` command: its sub-commands come from the `mmreduce.commands` entry points and all show in --help."""

from __future__ import annotations

import argparse
import re
from importlib.metadata import entry_points

from mmreduce.cli import COMMAND_GROUP, build_parser

DOCUMENTED = {"methods", "bench", "compare", "demo", "latency", "tokenizer", "train-seed-vlm", "train-tiny", "tune"}


def _commands(parser: argparse.ArgumentParser) -> set[str]:
    (subparsers,) = [action for action in parser._actions if isinstance(action, argparse._SubParsersAction)]
    return set(subparsers.choices)


def test_help_lists_every_entry_point_command():
    registered = {entry.name for entry in entry_points(group=COMMAND_GROUP)}
    assert registered | {"methods"} == DOCUMENTED, (
        "the mmreduce.commands entry points differ from the documented commands; after editing pyproject.toml, "
        "reinstall (pip install -e .)")
    parser = build_parser()
    assert DOCUMENTED <= _commands(parser)  # a module may add more than one (tune also adds rank-analysis)
    listed = parser.format_help()
    for command in sorted(DOCUMENTED):
        assert re.search(rf"^ +{re.escape(command)}( |$)", listed, re.M), f"{command} missing from --help:\n{listed}"
