"""`mmreduce compare`: the equal-budget comparison of schedules, in one command.

    mmreduce compare --model tiny-llava-shapes --dataset shapes --out runs/compare-shapes

On the benchmark's `calibration` split it runs the attention-rank analysis, G-Search at its own operating point
(tolerance ε, "no loss, least cost"), G-Search under each budget (`gsearch_within`) and P-Sigmoid tuned by
Bayesian optimization for each budget. Then, on the `test` split (never the calibration split), it evaluates the
baseline, random, FastV, PyramidDrop and the searched schedules side by side with `mmreduce bench`; `--with
visionzip tome ...` adds methods fitted to each budget (`NAME:equivalent=B`), e.g. the before-the-LLM ones;
`--oracle` adds the oracle (eval/oracle.py: keeps the tokens under the asked objects first) at every budget, an
upper reference row, not a method.

`--panel NAME NAME ...` runs the same comparison (dataset, budgets, seeds) on every model of the panel, each into
`OUT/<name>/`, then writes `OUT/panel.{json,md,png}`: per method and budget, each model's accuracy and the mean over
the models with a bootstrap 95% interval over the test samples (eval/panel.py).

Output (`--out DIR`): `rank/` (JSON + Kendall τ heat map), `schedules/*.json` (each with a `.log.json` of its
search), `bench/` (results.json / .md / accuracy_vs_flops.png, per-sample predictions) and `summary.json` with
the search costs (model evaluations, seconds).

A budget is a promise. A searched schedule whose mean keep exceeds its budget (P-Sigmoid can miss it when no trial
fits) is written with `"budget_met": false`, warned about, flagged in `summary.json` (`over_budget`, and
`budget_met` on its result row) and marked in its cell of `comparison.md`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

__all__ = ["DEFAULT_BUDGETS", "add_subparser", "budget_check", "comparison_markdown", "plot_comparison", "run_compare"]

#: 192 / 128 / 64 of LLaVA-1.5's 576 tokens. With layer 0 always full, an L-layer model cannot go below 1/L on
#: average (12.5% at 8 layers), so budgets under that are reported as skipped; `--budgets` picks others.
DEFAULT_BUDGETS = (0.333, 0.222, 0.111)


def _baselines(budget: float, depth: int) -> list[str]:
    """random / FastV / PyramidDrop specs fitted to `budget`; drops start at layer 1 so small budgets are reachable."""
    pdrop_layers = "+".join(str(max(1, round(depth * q / 8))) for q in (1, 3, 5))  # 1+3+5 at 8 layers
    return [f"random:layer=1,equivalent={budget}", f"fastv:layer=1,equivalent={budget}",
            f"pdrop:layers={pdrop_layers},equivalent={budget}"]


#: Slack when comparing a schedule's mean keep with its budget (float noise only).
_SLACK = 1e-12


def budget_check(row: dict, summary: dict) -> dict | None:
    """For the result row of a schedule searched under a budget: {"budget", "mean_keep", "budget_met"}, with the
    mean keep over layers of the schedule as searched (`summary["searches"]`). None for every other row."""
    spec = row["spec"]
    if not spec.startswith("schedule:path="):
        return None
    search = summary.get("searches", {}).get(Path(spec.split("=", 1)[1]).stem)
    if not search or search.get("budget") is None or not search.get("keep"):
        return None
    budget, mean = float(search["budget"]), sum(search["keep"]) / len(search["keep"])
    return {"budget": budget, "mean_keep": round(mean, 6), "budget_met": mean <= budget + _SLACK}


def comparison_markdown(summary: dict) -> str:
    """One line per budget, one column per method: accuracy, then mean vision tokens and prefill FLOPs share.

    A searched schedule over its budget keeps its cell, marked `over budget: MEAN > BUDGET`, and a note under the
    table names it: it is not an equal-budget result."""
    rows = summary["results"]
    baseline = next(r for r in rows if r["spec"] == "baseline")
    references = [r for r in rows if r.get("reference")]  # the oracle's rows, one per budget run, last
    rows = [r for r in rows if not r.get("reference")]
    families = ("random", "fastv", "pdrop", "gsearch", "psigmoid", *summary.get("with_methods", ()))
    over: list[str] = []

    def cell(row: dict) -> str:
        if row.get("accuracy") is None:
            return "skipped"
        text = (f"**{100 * row['accuracy']:.1f}%** ({row['equivalent_vision_tokens']:.0f} tok, "
                f"{100 * row['flops_ratio']:.0f}% FLOPs")
        check = budget_check(row, summary)
        if check is not None and not check["budget_met"]:
            text += f"; over budget: {check['mean_keep']:.4g} > {check['budget']:g}"
            over.append(f"`{Path(row['spec'].split('=', 1)[1]).stem}` keeps {check['mean_keep']:.4g} of the vision "
                        f"tokens on average, over its budget of {check['budget']:g}")
        return text + ")"

    oracle_header = " oracle (upper reference) |" if references else ""
    lines = ["| budget (mean kept) | " + " | ".join(families) + " |" + oracle_header,
             "|---" * (len(families) + 1 + bool(references)) + "|",
             f"| baseline | {cell(baseline)} |" + " |" * (len(families) - 1 + bool(references))]
    own = next((r for r in rows if r["spec"].endswith("/gsearch.json")), None)
    if own is not None:
        lines.append("| G-Search, own point | | | | " + cell(own) + " |" + " |" * (len(families) - 4))
    reduced = rows[2:] if own is not None else rows[1:]
    for start in range(0, len(reduced), len(families)):
        group = {_family(r["spec"]): r for r in reduced[start:start + len(families)]}
        budget = summary["budgets_run"][start // len(families)]
        oracle_cell = ""
        if references:
            oracle_cell = " " + (cell(references[start // len(families)])
                                 if start // len(families) < len(references) else "") + " |"
        lines.append(f"| {budget:.1%} | " + " | ".join(cell(group[f]) if f in group else "" for f in families) + " |"
                     + oracle_cell)
    for budget, why in summary.get("skipped_budgets", {}).items():
        lines.append(f"| {float(budget):.1%} | skipped: {why} |" + " |" * (len(families) - 1))
    if over:
        lines += ["", "**Over budget, not an equal-budget result:** " + "; ".join(over) + "."]
    return "\n".join(lines)


def run_compare(model_name: str, dataset: str, out: str, budgets=DEFAULT_BUDGETS, calibration_samples: int = 64,
                samples: int = 200, seed: int = 0, objective: str = "agreement", epsilon: float = 0.01,
                grid: int = 16, trials: int = 30, batch_size: int = 16, progress: bool = True,
                with_methods: tuple[str, ...] = (), oracle: bool = False) -> dict:
    """Runs the whole comparison (see the module docstring); returns the summary written to `out/summary.json`."""
    import torch

    from mmreduce.schedules import (Budget, Calibration, gsearch, gsearch_within, plot_kendall, psigmoid_schedule,
                                    rank_analysis, tune_psigmoid)

    from .harness import BenchConfig, run_bench
    from .tune import calibration_set

    budgets = [float(b) for b in budgets]
    import mmreduce
    from mmreduce.spec import fits_equivalent

    for name in with_methods:
        if name not in mmreduce.list_methods() or not fits_equivalent(name):
            raise ValueError(f"--with {name}: not a registered method that takes an equivalent= budget; choose from "
                             f"{[n for n in mmreduce.list_methods() if fits_equivalent(n)]}")
    if not budgets or any(not 0 < b <= 1 for b in budgets):
        raise ValueError(f"budgets must be fractions in (0, 1], got {budgets!r}")
    root = Path(out)
    (root / "schedules").mkdir(parents=True, exist_ok=True)
    (root / "rank").mkdir(parents=True, exist_ok=True)
    say = print if progress else (lambda *a, **k: None)
    torch.manual_seed(seed)

    model, _, batches, labels = calibration_set(model_name, dataset, calibration_samples, batch_size, seed)
    summary: dict = {"model": model_name, "dataset": dataset, "calibration_samples": calibration_samples,
                     "test_samples": samples, "seed": seed, "objective": objective, "budgets": budgets}

    start = time.perf_counter()
    rank = rank_analysis(model, batches)
    (root / "rank" / "rank_analysis.json").write_text(json.dumps(rank, indent=2))
    plot_kendall(rank, root / "rank" / "kendall_tau.png", title=f"{model_name}: Kendall τ between layers")
    summary["rank"] = {"mean_tau_excluding_layer0": rank["mean_tau_excluding_layer0"],
                       "mean_tau_with_layer0": rank["mean_tau_with_layer0"],
                       "seconds": round(time.perf_counter() - start, 1)}
    say(f"rank analysis: mean τ between layers >= 1 {rank['mean_tau_excluding_layer0']:.3f}, "
        f"layer 0 vs others {rank['mean_tau_with_layer0']:.3f}")

    calibration = Calibration(model, batches, labels, objective=objective)
    depth = calibration.num_layers
    scores: dict = {}  # every G-Search run below shares its evaluations
    searches: dict = {}

    def record(name: str, schedule, entry: dict) -> str:
        path = root / "schedules" / f"{name}.json"
        mean = sum(schedule.keep) / depth
        fields = {}
        if entry.get("budget") is not None:  # searched under a budget: say whether it kept the promise
            met = mean <= entry["budget"] + _SLACK
            fields = {"budget_met": met, "cost": round(mean, 6), "budget_kind": "equivalent",
                      "budget_value": entry["budget"]}
            if not met:
                print(f"WARNING: {name} keeps {mean:.3f} of the vision tokens on average, over its budget of "
                      f"{entry['budget']:g}; it is marked over budget in summary.json and comparison.md (more "
                      "--trials may fit it)", file=sys.stderr)
        path.write_text(json.dumps(schedule.to_dict() | fields, indent=2))
        path.with_suffix(".log.json").write_text(json.dumps(entry | fields, indent=2, default=str))
        searches[name] = ({k: v for k, v in entry.items() if k not in ("log", "trials")} | fields
                          | {"keep": list(schedule.keep)})
        say(f"{name}: keep [{', '.join(f'{k:.2f}' for k in schedule.keep)}] "
            f"(mean {mean:.3f}), {entry['evaluations']} evaluations, {entry['seconds']:.0f} s")
        return str(path)

    schedule, result = gsearch(calibration, epsilon, grid, model_name, progress=progress, score_cache=scores)
    own = record("gsearch", schedule, {"epsilon": epsilon, "evaluations": result.evaluations,
                                       "seconds": round(result.seconds, 1), "log": result.log})
    specs = ["baseline", f"schedule:path={own}"]
    skipped, budgets_run = {}, []
    for budget in budgets:
        if budget < 1 / depth - 1e-9:
            skipped[str(budget)] = (f"below 1/{depth}: layer 0 keeps every vision token, so no method reaches "
                                    f"{budget} on a {depth}-layer model")
            say(f"budget {budget}: skipped ({skipped[str(budget)]})")
            continue
        budgets_run.append(budget)
        specs += _baselines(budget, depth)
        specs += [f"{name}:equivalent={budget}" for name in with_methods]
        schedule, result, tolerance = gsearch_within(calibration, budget, grid, model_name, score_cache=scores)
        specs.append("schedule:path=" + record(f"gsearch-{budget}", schedule, {
            "budget": budget, "epsilon": tolerance, "evaluations": result.evaluations,
            "seconds": round(result.seconds, 1), "log": result.log}))
        limit = Budget("equivalent", budget)
        tuned = tune_psigmoid(depth, calibration.evaluate, limit, trials=trials, seed=seed, progress=progress)
        specs.append("schedule:path=" + record(f"psigmoid-{budget}", psigmoid_schedule(tuned, model_name, limit), {
            "budget": budget, "params": tuned.params, "calibration_objective": tuned.objective, "cost": tuned.cost,
            "evaluations": len(tuned.trials), "seconds": round(tuned.seconds, 1), "trials": tuned.trials}))
    summary["searches"] = searches
    summary["skipped_budgets"] = skipped
    summary["budgets_run"] = budgets_run
    summary["with_methods"] = list(with_methods)
    summary["oracle"] = bool(oracle and budgets_run)

    rows = run_bench(BenchConfig(model=model_name, dataset=dataset, specs=specs, samples=samples, seed=seed,
                                 split="test", batch_size=batch_size, out=str(root / "bench"), progress=progress,
                                 oracle=summary["oracle"], oracle_budgets=tuple(budgets_run) if oracle else ()))
    for row in rows:
        check = budget_check(row, summary)
        if check is not None:
            row.update(check)
    summary["results"] = rows
    summary["over_budget"] = [name for name, s in searches.items() if s.get("budget_met") is False]
    (root / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    (root / "comparison.md").write_text(comparison_markdown(summary) + "\n")
    plot_comparison(summary, root / "accuracy_vs_flops.png")
    return summary


def _family(spec: str) -> str:
    """The plot label of a bench spec: searched schedules by what searched them (file `gsearch-0.333.json` ->
    `gsearch`), every other method by its registered name."""
    if spec.startswith("schedule:path="):
        return Path(spec.split("=", 1)[1]).stem.split("-")[0]
    return spec.split(":")[0]


def plot_comparison(summary: dict, path) -> None:
    """Accuracy against prefill FLOPs, one line per method, G-Search and P-Sigmoid apart (the bench plot draws
    every searched schedule as one `schedule` line)."""
    from .harness import plot_results

    rows = [{**r, "spec": _family(r["spec"])} for r in summary["results"]]
    plot_results(rows, path, title=f"{summary['model']} on {summary['dataset']}: equal-budget comparison")


def add_subparser(subparsers) -> None:
    parser = subparsers.add_parser(
        "compare", help="rank analysis, G-Search, P-Sigmoid and the equal-budget comparison on the test split",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="the model to compare (default tiny-llava-shapes)")
    parser.add_argument("--panel", nargs="+", default=None, metavar="NAME",
                        help="compare every model of a panel (bundled names or folders) and aggregate them into "
                             "OUT/panel.{json,md,png}; instead of --model")
    parser.add_argument("--dataset", default="shapes")
    parser.add_argument("--budgets", type=float, nargs="+", default=list(DEFAULT_BUDGETS),
                        help="equivalent fractions of the vision tokens (mean over layers)")
    parser.add_argument("--calibration-samples", type=int, default=64)
    parser.add_argument("--samples", type=int, default=200, help="test samples")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--objective", choices=["agreement", "accuracy"], default="agreement")
    parser.add_argument("--epsilon", type=float, default=0.01, help="G-Search tolerance at its own operating point")
    parser.add_argument("--grid", type=int, default=16)
    parser.add_argument("--trials", type=int, default=30, help="P-Sigmoid Bayesian optimization trials")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--with", dest="with_methods", nargs="+", default=[], metavar="NAME",
                        help="more methods fitted to each budget (NAME:equivalent=B), e.g. pool stride visionzip tome")
    parser.add_argument("--oracle", action="store_true",
                        help="add the oracle at every budget: an upper reference row (eval/oracle.py), not a method")
    parser.add_argument("--resamples", type=int, default=1000, help="--panel: bootstrap resamples of the test samples")
    parser.add_argument("--out", default="runs/compare")
    parser.add_argument("--no-progress", action="store_true")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from .harness import results_markdown

    if args.panel is not None:
        return _run_panel(args)
    summary = run_compare(args.model or "tiny-llava-shapes", args.dataset, args.out, args.budgets, args.calibration_samples, args.samples,
                          args.seed, args.objective, args.epsilon, args.grid, args.trials, args.batch_size,
                          not args.no_progress, tuple(args.with_methods), args.oracle)
    print(results_markdown(summary["results"]))
    print()
    print(comparison_markdown(summary))
    print(f"\nwritten: {args.out}/summary.json, rank/, schedules/, bench/")
    return 0


def _run_panel(args: argparse.Namespace) -> int:
    from .panel import run_panel

    if args.model is not None:
        raise ValueError("give either --model NAME (one model) or --panel NAME NAME ... (several), not both")
    panel = run_panel(args.panel, args.dataset, args.out, resamples=args.resamples, budgets=args.budgets,
                      calibration_samples=args.calibration_samples, samples=args.samples, seed=args.seed,
                      objective=args.objective, epsilon=args.epsilon, grid=args.grid, trials=args.trials,
                      batch_size=args.batch_size, progress=not args.no_progress,
                      with_methods=tuple(args.with_methods), oracle=args.oracle)
    print((Path(args.out) / "panel.md").read_text())
    print(f"written: {args.out}/panel.json, panel.md, panel.png and one compare run per model "
          f"({', '.join(panel['folders'])})")
    return 0
