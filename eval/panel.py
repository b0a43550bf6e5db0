"""`mmreduce compare --panel`: one equal-budget comparison per model, aggregated with its uncertainty.

    mmreduce compare --panel tiny-llava-shapes-v1 tiny-llava-shapes-v2 tiny-llava-shapes --dataset shapes \\
        --budgets 0.333 0.222 0.15 --oracle --out runs/panel-shapes

A finding of one checkpoint can flip with the training run; a panel reads it on several. Every model runs the same
`mmreduce compare` (same dataset, budgets and seeds, hence the same test samples) into `OUT/<name>/`. Then, for each
method and budget, the panel reports each model's accuracy and the mean over the models with a bootstrap 95%
interval over the test samples: each resample draws sample indices with replacement, the SAME indices for every
model (the models answered the same questions, so their errors are paired), and the interval is the 2.5 and 97.5
percentiles of the resampled panel mean. It measures how much the mean would move with other test samples from
the same generator, not how it would move with other training runs (the spread of the models shows that).

The per-sample correctness comes from each run's predictions (`bench/results.json`), scored against the test
samples' answers; nothing is evaluated twice. Output: `OUT/panel.json`, `OUT/panel.md`, `OUT/panel.png`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = ["bootstrap_interval", "check_panel", "panel_from_runs", "panel_from_summaries", "panel_markdown",
           "plot_panel", "run_panel"]


def bootstrap_interval(correct, resamples: int = 1000, seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): the mean accuracy over models and its bootstrap interval over samples.

    correct: (samples,) or (models, samples) of 0/1, every model scored on the same samples. Each of `resamples`
    draws `samples` indices with replacement (seeded) and applies them to every model jointly.
    """
    matrix = np.asarray(correct, dtype=float)
    if matrix.ndim == 1:
        matrix = matrix[None, :]
    if matrix.ndim != 2 or matrix.shape[1] == 0 or matrix.shape[0] == 0:
        raise ValueError(f"correct must be (samples,) or (models, samples) with at least one of each, "
                         f"got shape {matrix.shape}")
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    indices = np.random.default_rng(seed).integers(0, matrix.shape[1], size=(resamples, matrix.shape[1]))
    panel_means = matrix[:, indices].mean(axis=2).mean(axis=0)  # (models, resamples, samples) -> (resamples,)
    tail = (1 - level) / 2
    low, high = np.quantile(panel_means, [tail, 1 - tail])
    return float(matrix.mean()), float(low), float(high)


def check_panel(models: Sequence[str]) -> list[str]:
    """The folder name each model's run is written to; raises ValueError naming a bad panel before any work."""
    from .tiny_models import resolve_checkpoint

    models = list(models)
    if len(models) < 2:
        raise ValueError(f"--panel compares two or more models, got {models}; for one model use --model NAME")
    for model in models:
        resolve_checkpoint(model)  # "no tiny checkpoint 'x': not a folder and not one of [...]"
    folders = [Path(str(model)).name for model in models]
    repeated = sorted({folder for folder in folders if folders.count(folder) > 1})
    if repeated:
        raise ValueError(f"--panel names {repeated} more than once (each model's run goes to OUT/<name>); "
                         "give each model once")
    return folders


def _method_and_budget(row: dict, summary: dict) -> tuple[str, float | None]:
    """("baseline", 1.0), ("oracle", B), ("gsearch (own point)", None) or (method family, B) of a result row."""
    from .compare import _family

    spec = row["spec"]
    if row.get("reference"):
        return "oracle", float(re.match(r"oracle@([0-9.eE+-]+)", spec).group(1))
    if spec == "baseline":
        return "baseline", 1.0
    if spec.startswith("schedule:path="):
        search = summary.get("searches", {}).get(Path(spec.split("=", 1)[1]).stem, {})
        if search.get("budget") is None:
            return f"{_family(spec)} (own point)", None
        return _family(spec), float(search["budget"])
    match = re.search(r"equivalent=([0-9.eE+-]+)", spec)
    return _family(spec), float(match.group(1)) if match else None


def _correctness(row: dict, answers: Sequence[str], model: str) -> list[bool]:
    from .accuracy import is_correct

    predictions = row.get("predictions") or []
    if len(predictions) != len(answers):
        raise ValueError(f"{model}: {row['spec']} has {len(predictions)} predictions for {len(answers)} test samples; "
                         "every model of a panel must run on the same samples (same --samples and --seed)")
    correct = [bool(is_correct(p, a)) for p, a in zip(predictions, answers)]
    if abs(sum(correct) / len(correct) - row["accuracy"]) > 1e-9:
        raise ValueError(f"{model}: {row['spec']}: the predictions rescore to {sum(correct) / len(correct):.4f}, "
                         f"not the recorded {row['accuracy']:.4f}; were the samples generated differently?")
    return correct


def panel_from_summaries(summaries: dict[str, dict], answers: Sequence[str], resamples: int = 1000,
                         seed: int = 0) -> dict:
    """The panel record from each model's compare summary (`summary.json`, with its result rows' predictions).

    Returns {"models", "samples", "resamples", "seed", "rows": [{"method", "budget", "accuracy": {model: acc or
    None}, "flops_ratio": {model: ...}, "mean", "low", "high", "models": n}], "rank": {model: τ means}}; a row a
    model skipped (or does not have) counts as None and the mean is over the models that ran it.
    """
    models = list(summaries)
    keyed: dict[tuple, dict[str, dict]] = {}
    for model, summary in summaries.items():
        for row in summary["results"]:
            keyed.setdefault(_method_and_budget(row, summary), {})[model] = row
    rows = []
    for (method, budget), by_model in keyed.items():
        ran = [m for m in models if m in by_model and by_model[m].get("accuracy") is not None]
        entry = {"method": method, "budget": budget,
                 "accuracy": {m: by_model[m]["accuracy"] if m in ran else None for m in models},
                 "flops_ratio": {m: by_model[m].get("flops_ratio") if m in ran else None for m in models},
                 "models": len(ran), "mean": None, "low": None, "high": None,
                 # a searched schedule that missed its budget (compare's budget_check): not an equal-budget result
                 "over_budget": [m for m in ran if by_model[m].get("budget_met") is False]}
        if ran:
            matrix = [_correctness(by_model[m], answers, m) for m in ran]
            entry["mean"], entry["low"], entry["high"] = bootstrap_interval(matrix, resamples, seed)
        rows.append(entry)
    order = {"baseline": 0, "oracle": 2}
    rows.sort(key=lambda r: (r["budget"] is None, -(r["budget"] or 0), order.get(r["method"], 1)))
    rank = {m: {k: s.get("rank", {}).get(k) for k in ("mean_tau_excluding_layer0", "mean_tau_with_layer0")}
            for m, s in summaries.items()}
    first = next(iter(summaries.values()))
    return {"models": models, "dataset": first.get("dataset"), "samples": len(answers), "seed": seed,
            "resamples": resamples, "rows": rows, "rank": rank}


def panel_markdown(panel: dict) -> str:
    """One line per method x budget: each model's accuracy, the mean and its bootstrap 95% interval; then τ."""

    def pct(value) -> str:
        return "—" if value is None else f"{100 * value:.1f}%"

    models = panel["models"]
    lines = ["| method | budget | " + " | ".join(models) + " | mean [95% interval] |",
             "|---|---|" + "---|" * len(models) + "---|"]
    for row in panel["rows"]:
        budget = "own point" if row["budget"] is None else f"{100 * row['budget']:.1f}%"
        name = "oracle (upper reference)" if row["method"] == "oracle" else row["method"]
        mean = "—" if row["mean"] is None else f"**{pct(row['mean'])}** [{pct(row['low'])}, {pct(row['high'])}]"
        cells = [pct(row["accuracy"][m]) + (" (over budget)" if m in row.get("over_budget", ()) else "")
                 for m in models]
        lines.append(f"| {name} | {budget} | " + " | ".join(cells) + f" | {mean} |")
    lines += ["", (f"Mean over {len(models)} models; interval: bootstrap over the {panel['samples']} test samples "
                   f"({panel['resamples']} resamples, seed {panel['seed']}, the same indices for every model)."), "",
              "| model | mean Kendall τ between layers >= 1 | layer 0 against the others |", "|---|---|---|"]
    for model, tau in panel["rank"].items():
        cells = ["—" if v is None else f"{v:.3f}" for v in (tau["mean_tau_excluding_layer0"],
                                                           tau["mean_tau_with_layer0"])]
        lines.append(f"| {model} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


def plot_panel(panel: dict, path, title: str = "") -> None:
    """Accuracy against budget, one panel per method: each model's points, the mean and its interval as a band;
    the baseline (dotted) and the oracle (dashed), means over models, in every panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in panel["rows"] if r["budget"] is not None and r["mean"] is not None]
    methods = [m for m in dict.fromkeys(r["method"] for r in rows) if m not in ("baseline", "oracle")]
    baseline = next((r for r in rows if r["method"] == "baseline"), None)
    oracle = sorted((r for r in rows if r["method"] == "oracle"), key=lambda r: r["budget"])
    columns = min(4, max(1, len(methods)))
    lines = -(-max(1, len(methods)) // columns)
    fig, axes = plt.subplots(lines, columns, figsize=(3.2 * columns, 2.8 * lines), dpi=110, squeeze=False,
                             sharex=True, sharey=True)
    markers = "osD^vP*X"
    for ax, method in zip(axes.flat, methods):
        points = sorted((r for r in rows if r["method"] == method), key=lambda r: r["budget"])
        x = [100 * r["budget"] for r in points]
        for k, model in enumerate(panel["models"]):
            ys = [(xx, 100 * r["accuracy"][model]) for xx, r in zip(x, points) if r["accuracy"][model] is not None]
            offset = 0.8 * (k - (len(panel["models"]) - 1) / 2)  # side by side, so equal accuracies stay visible
            ax.scatter([p[0] + offset for p in ys], [p[1] for p in ys], s=16, marker=markers[k % len(markers)],
                       alpha=0.75, label=model)
        means = [100 * r["mean"] for r in points]
        ax.errorbar(x, means, yerr=[[m - 100 * r["low"] for m, r in zip(means, points)],
                                    [100 * r["high"] - m for m, r in zip(means, points)]],
                    color="black", lw=1.5, capsize=4, label="mean, 95% interval")
        if baseline is not None:
            ax.axhline(100 * baseline["mean"], color="grey", ls=":", lw=1, label="baseline (mean)")
        if oracle:
            ax.plot([100 * r["budget"] for r in oracle], [100 * r["mean"] for r in oracle], color="tab:red",
                    ls="--", lw=1, marker="*", label="oracle (mean)")
        ax.set_title(method, fontsize=9)
        ax.grid(alpha=0.3)
    budgets = [100 * r["budget"] for r in rows if r["method"] != "baseline"] or [0.0]
    axes.flat[0].set_xlim(min(budgets) - 4, max(budgets) + 4)  # shared: room for the side-by-side points
    for ax in list(axes.flat)[len(methods):]:
        ax.axis("off")
    for ax in list(axes.flat)[:len(methods)]:
        ax.tick_params(labelbottom=True)  # shared x hides them above an empty cell of the last row
    for ax in list(axes.flat)[max(0, len(methods) - columns):len(methods)]:
        ax.set_xlabel("budget (% of vision tokens)")
    for ax in axes[:, 0]:
        ax.set_ylabel("accuracy (%)")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 4), fontsize=7, frameon=False)
    fig.suptitle(title or f"panel of {len(panel['models'])} models on {panel.get('dataset')}", fontsize=10)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path)
    plt.close(fig)


def panel_from_runs(out: str, models: Sequence[str], folders: Sequence[str], dataset: str, samples: int,
                    seed: int, resamples: int = 1000) -> dict:
    """Aggregates the finished runs `OUT/<folder>/summary.json` (no model runs again); writes panel.{json,md,png}."""
    from .benchmarks import load_benchmark

    root = Path(out)
    summaries = {}
    for model, folder in zip(models, folders):
        file = root / folder / "summary.json"
        if not file.is_file():
            raise ValueError(f"{file} is missing: the compare run of {model} did not finish; run the command again")
        summaries[str(model)] = json.loads(file.read_text())
    answers = [sample.answer for sample in load_benchmark(dataset, "test", samples, seed=seed)]
    panel = panel_from_summaries(summaries, answers, resamples, seed) | {"folders": list(folders)}
    (root / "panel.json").write_text(json.dumps(panel, indent=2))
    (root / "panel.md").write_text(panel_markdown(panel) + "\n")
    plot_panel(panel, root / "panel.png")
    return panel


def run_panel(models: Sequence[str], dataset: str, out: str, resamples: int = 1000, **compare_options) -> dict:
    """`run_compare` on every model into `OUT/<name>/`, then `panel_from_runs`; returns the panel record."""
    from .compare import run_compare

    folders = check_panel(models)  # every name checked before any model runs
    if resamples < 1:
        raise ValueError(f"--resamples must be >= 1, got {resamples}")
    for model, folder in zip(models, folders):
        if compare_options.get("progress", True):
            print(f"== panel: {model} -> {Path(out) / folder}")
        run_compare(model, dataset, str(Path(out) / folder), **compare_options)
    return panel_from_runs(out, models, folders, dataset, compare_options.get("samples", 200),
                           compare_options.get("seed", 0), resamples)
