"""`mmreduce bench`: the side-by-side comparison on a benchmark (see eval/harness.py)."""

from __future__ import annotations

import argparse

__all__ = ["DEFAULT_SPECS", "add_subparser", "positive_int", "run_from_args"]

# 192 / 128 / 64 of LLaVA-1.5's 576 tokens = 33% / 22% / 11%, fitted per method (`equivalent=`). Drops start at
# layer 1 so that the small budgets are reachable on 8-layer models (layer 0 always stays full).
_BUDGETS = (0.333, 0.222, 0.111)
DEFAULT_SPECS = ["baseline"] + [
    f"{method}:{where},equivalent={budget}"
    for budget in _BUDGETS
    for method, where in (("random", "layer=1"), ("fastv", "layer=1"), ("pdrop", "layers=1+3+5"))
]


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (argparse turns the ValueError into a one-line usage error)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value


def add_subparser(subparsers) -> None:
    parser = subparsers.add_parser(
        "bench", help="accuracy / tokens / FLOPs / latency of methods side by side on a benchmark",
        description="Evaluate methods side by side. A SPEC is NAME or NAME:key=value,key=value (lists joined with "
                    "'+'), e.g. pdrop:layers=2+4+6,keep_ratio=0.5; 'baseline' is the unreduced model; "
                    "equivalent=F fits keep_ratio so that F of the vision tokens remain on average over layers.")
    parser.add_argument("--model", default="tiny-llava-shapes",
                        help="bundled tiny model name, or a folder holding a saved VLM of a supported family and its processor")
    parser.add_argument("--dataset", default="shapes",
                        help="benchmark name (shapes, docs, video) or a dataset file (.jsonl, see README)")
    parser.add_argument("--methods", nargs="+", default=DEFAULT_SPECS, metavar="SPEC")
    parser.add_argument("--samples", type=positive_int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--split", default="test", choices=["train", "calibration", "test"])
    parser.add_argument("--batch-size", type=positive_int, default=16)
    parser.add_argument("--max-new-tokens", type=positive_int, default=3)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--out", default="runs/bench", help="output directory (results.json, .md, .png, cache/)")
    parser.add_argument("--oracle", action="store_true",
                        help="add an 'oracle@F (upper reference)' row per equivalent=F budget of the methods: the "
                             "tokens under the asked objects first, then random (it reads the answer's location; "
                             "a ceiling, not a method)")
    parser.add_argument("--oracle-budgets", type=float, nargs="+", default=(), metavar="F",
                        help="the oracle rows' budgets (fractions, or token counts > 1) instead; implies --oracle")
    parser.add_argument("--no-progress", action="store_true")
    parser.set_defaults(func=run_from_args)


def run_from_args(args: argparse.Namespace) -> int:
    from .harness import BenchConfig, results_markdown, run_bench

    config = BenchConfig(model=args.model, dataset=args.dataset, specs=args.methods, samples=args.samples,
                         seed=args.seed, split=args.split, batch_size=args.batch_size, out=args.out,
                         max_new_tokens=args.max_new_tokens, device=args.device, progress=not args.no_progress,
                         oracle=args.oracle or bool(args.oracle_budgets), oracle_budgets=tuple(args.oracle_budgets))
    rows = run_bench(config)
    print(results_markdown(rows))
    print(f"\nwritten: {args.out}/results.json, results.md, accuracy_vs_flops.png")
    return 0
