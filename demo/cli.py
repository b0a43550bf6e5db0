"""`mmreduce demo` (and `python -m mmreduce.demo`): start the Gradio app on this machine."""

from __future__ import annotations

import argparse
import os

__all__ = ["add_subparser", "build_parser", "main", "run"]

_LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def _configure(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--port", type=int, default=7860, help="port to serve on (default 7860)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default 127.0.0.1: this machine only; 0.0.0.0 exposes the demo "
                             "to your network)")
    parser.add_argument("--model", default=None,
                        help="a bundled tiny model name or a local checkpoint directory (LLaVA-1.5 / LLaVA-NeXT); "
                             "default tiny-llava-shapes")
    parser.set_defaults(func=run)
    return parser


def add_subparser(subparsers) -> argparse.ArgumentParser:
    """Adds the `demo` sub-command to the `mmreduce` CLI."""
    return _configure(subparsers.add_parser("demo", help="compare methods side by side in a browser (Gradio)"))


def build_parser() -> argparse.ArgumentParser:
    return _configure(argparse.ArgumentParser(prog="python -m mmreduce.demo", description=__doc__))


def run(args: argparse.Namespace) -> int:
    # Nothing leaves the machine: no usage analytics, no hub downloads (the models are local files).
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not 0 < args.port < 65536:
        raise SystemExit(f"--port must be in 1..65535, got {args.port}")
    from .app import DEFAULT_MODEL, ModelStore, build_app, launch

    try:
        store = ModelStore(default=args.model or DEFAULT_MODEL)
    except ValueError as error:
        raise SystemExit(f"--model: {error}") from None
    store.get(store.default)  # load now, so a broken checkpoint fails here and the first request is fast
    if args.host not in _LOCAL_HOSTS:
        print(f"warning: serving on {args.host}: anyone who can reach this address can use the demo")
    launch(build_app(store), host=args.host, port=args.port)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run(args)
