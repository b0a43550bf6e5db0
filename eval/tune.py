"""`mmreduce tune` and `mmreduce rank-analysis` on a bundled (or local) model and a benchmark's calibration split.

    mmreduce tune --model tiny-llava-shapes --dataset shapes --method gsearch --epsilon 0.01 --out gsearch.json
    mmreduce tune --model tiny-llava-shapes --dataset shapes --method psigmoid --budget 0.22 --out psig.json
    mmreduce rank-analysis --model tiny-llava-shapes --dataset shapes --out runs/rank

Schedules are searched on the `calibration` split (never on `test`); `wrap(model, "schedule", path=...)` runs them.
A budget is a promise: when no P-Sigmoid trial fits it, `tune` refuses (more `--trials` or a looser `--budget`
usually fix it) unless `--allow-over-budget` is given; the schedule JSON then says `"budget_met": false` and its
`"cost"`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

__all__ = ["add_subparser", "calibration_set"]


def calibration_set(model_name: str, dataset: str, samples: int, batch_size: int, seed: int = 0,
                    split: str = "calibration"):
    """(model, processor, batches, labels): processor outputs and (B,) first-answer-token ids per batch."""
    from .accuracy import batch_inputs
    from .benchmarks import load_benchmark
    from .tiny_models import load_tiny

    model, processor = load_tiny(model_name)
    items = load_benchmark(dataset, split, samples, seed=seed)
    batches, labels = [], []
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        batches.append(dict(batch_inputs(processor, chunk)))
        ids = [processor.tokenizer(" " + s.answer, add_special_tokens=False)["input_ids"] for s in chunk]
        ids = [x if x else processor.tokenizer(s.answer, add_special_tokens=False)["input_ids"] for x, s in zip(ids, chunk)]
        labels.append(torch.tensor([x[0] for x in ids]))
    return model, processor, batches, labels


def _tune(args: argparse.Namespace) -> int:
    from mmreduce.flops import ModelDims
    from mmreduce.schedules import Budget, Calibration, gsearch, psigmoid_schedule, schedule_cost, tune_psigmoid

    if Path(args.out).is_dir():
        raise ValueError(f"--out {args.out!r} is a folder; give the schedule file to write (e.g. "
                         f"{str(Path(args.out) / (args.method + '.json'))!r})")
    budget = None
    if args.method == "psigmoid":  # read the budget before loading anything
        if args.budget is None:
            raise ValueError("--budget is required for --method psigmoid (e.g. --budget 0.22 or --budget flops=0.4)")
        budget = Budget.parse(args.budget)
        if args.trials < 1:
            raise ValueError(f"--trials must be >= 1, got {args.trials}")
    torch.manual_seed(args.seed)
    model, _, batches, labels = calibration_set(args.model, args.dataset, args.samples, args.batch_size, args.seed)
    calibration = Calibration(model, batches, labels, objective=args.objective)
    print(f"calibration: {args.samples} {args.dataset} samples, objective {args.objective}, "
          f"unreduced score {calibration.reference_score:.3f}")
    start = time.perf_counter()
    extra: dict = {}
    if args.method == "gsearch":
        schedule, result = gsearch(calibration, epsilon=args.epsilon, grid_size=args.grid, model_name=args.model)
        record = {"evaluations": result.evaluations, "seconds": result.seconds, "log": result.log}
    else:
        depth = calibration.num_layers
        if budget.kind == "equivalent" and budget.value < 1 / depth:
            raise ValueError(f"--budget {args.budget} is below 1/{depth} = {1 / depth:.3f}: layer 0 keeps every vision "
                             f"token, so no schedule of this {depth}-layer model reaches it; use --budget >= "
                             f"{1 / depth:.3f}")
        dims = ModelDims.from_config(calibration.adapter.text_config)
        vision = int(calibration.adapter.count_vision_tokens(batches[0]["input_ids"][:1])[0])
        text = int(batches[0]["attention_mask"][0].sum()) - vision
        result = tune_psigmoid(depth, calibration.evaluate, budget,
                               cost=lambda keep: schedule_cost(keep, budget, dims, vision, text),
                               trials=args.trials, seed=args.seed)
        if not result.budget_met:
            fixes = f"run more --trials (now {args.trials}), loosen --budget"
            if not args.allow_over_budget:
                raise ValueError(f"{result.over_budget_message()}; nothing written to {args.out}. To fix: {fixes}, "
                                 "or pass --allow-over-budget to write it marked \"budget_met\": false")
            print(f"WARNING: {result.over_budget_message()}; writing it anyway (--allow-over-budget) with "
                  f"\"budget_met\": false in {args.out}. To fix: {fixes}", file=sys.stderr)
        schedule = psigmoid_schedule(result, args.model, budget)
        extra = result.budget_fields()
        record = {"params": result.params, "objective": result.objective, **extra,
                  "evaluations": len(result.trials), "seconds": result.seconds, "trials": result.trials}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(schedule.to_dict() | extra, indent=2))
    log_path = Path(args.out).with_suffix(".log.json")
    log_path.write_text(json.dumps({"args": vars(args) | {"func": None}, **record}, indent=2, default=str))
    keep = ", ".join(f"{k:.2f}" for k in schedule.keep)
    cost = f", cost {extra['cost']:.3f} of budget {budget.value:g}" if extra else ""
    print(f"schedule [{keep}] (mean {sum(schedule.keep) / len(schedule.keep):.3f}{cost}) -> {args.out}")
    print(f"{record['evaluations']} evaluations in {time.perf_counter() - start:.0f} s; log: {log_path}")
    return 0


def _rank(args: argparse.Namespace) -> int:
    from mmreduce.schedules import plot_kendall, rank_analysis

    model, _, batches, _ = calibration_set(args.model, args.dataset, args.samples, args.batch_size, args.seed)
    result = rank_analysis(model, batches)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "rank_analysis.json").write_text(json.dumps(result, indent=2))
    plot_kendall(result, out / "kendall_tau.png", title=f"{args.model}: Kendall τ between layers")
    print(f"mean τ between layers >= 1: {result['mean_tau_excluding_layer0']:.3f}; "
          f"layer 0 vs others: {result['mean_tau_with_layer0']:.3f} ({result['samples']} samples) -> {out}")
    return 0


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="tiny-llava-shapes")
    parser.add_argument("--dataset", default="shapes")
    parser.add_argument("--samples", type=int, default=64, help="calibration samples")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)


def add_subparser(subparsers) -> None:
    tune = subparsers.add_parser("tune", help="search (gsearch) or tune (psigmoid) a per-layer schedule",
                                 description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(tune)
    tune.add_argument("--method", choices=["gsearch", "psigmoid"], required=True)
    tune.add_argument("--objective", choices=["agreement", "accuracy"], default="agreement")
    tune.add_argument("--epsilon", type=float, default=0.01, help="gsearch: allowed objective loss")
    tune.add_argument("--grid", type=int, default=16, help="gsearch: grid of fractions k/GRID")
    tune.add_argument("--budget", default=None, help="psigmoid: 0.22 (equivalent fraction) or flops=0.4")
    tune.add_argument("--trials", type=int, default=30, help="psigmoid: Bayesian optimization trials")
    tune.add_argument("--allow-over-budget", action="store_true",
                      help="psigmoid: when no trial fits the budget, write the least-overrunning schedule (marked "
                           "\"budget_met\": false, with a warning) instead of refusing")
    tune.add_argument("--out", required=True, help="schedule JSON to write")
    tune.set_defaults(func=_tune)
    rank = subparsers.add_parser("rank-analysis", help="Kendall τ of vision-token attention rankings across layers")
    _common(rank)
    rank.add_argument("--out", default="runs/rank")
    rank.set_defaults(func=_rank)
