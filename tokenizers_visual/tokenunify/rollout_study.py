"""Roll-out study: TokenUnify's mixture schedule against next-token-only training, several seeds, equal steps.

On the EM-like volumes a next-only model learns the mean token, so roll-out growth cannot be compared there.
`--data volumes` (the default here) uses moving-disc volumes (`volumes.py`) with one token per slice, where the
next slice follows from the previous two. Equal compute: next-only trains 2N steps; the mixture trains N
random-token steps, then N steps of next + next-all (one backbone pass per step in both).

    python -m mmreduce.tokenizers_visual.tokenunify.rollout_study train --objective next --seed 0 --out DIR
    python -m mmreduce.tokenizers_visual.tokenunify.rollout_study eval --runs next=D0,D1,D2 tokenunify=E0,E1,E2 \\
        --json OUT.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

from .experiment import evaluate_prediction, evaluate_rollout, pretrain
from .model import DATA_KINDS, TokenUnifyConfig, TokenUnifyModel
from .rollout import growth_slope

__all__ = ["STUDY_OBJECTIVES", "format_tables", "plot_summary", "study_config", "summarise", "train_run"]

STUDY_OBJECTIVES = ("next", "tokenunify")
# One token per slice: 12 slices of 16x16, so roll-outs start after 2 given slices and run 10 steps.
VOLUME_SHAPE, SLICE_PATCH, ROLLOUT_START = (12, 16, 16), (1, 16, 16), 2


def study_config(data: str) -> TokenUnifyConfig:
    """The backbone of the main experiment (width 48, depth 3) on the chosen data."""
    if data == "volumes":
        return TokenUnifyConfig(volume=VOLUME_SHAPE, patch=SLICE_PATCH, data="volumes")
    return TokenUnifyConfig()


def train_run(objective: str, steps: int, seed: int, out: str | Path, data: str = "volumes", batch: int = 32,
              lr: float = 2e-3, log_path: str | Path | None = None) -> TokenUnifyModel:
    """next: `steps` next-token steps. tokenunify: steps // 2 random-token steps, then steps // 2 next + next-all."""
    if objective not in STUDY_OBJECTIVES:
        raise ValueError(f"objective must be one of {STUDY_OBJECTIVES}, got {objective!r}")
    if not isinstance(steps, int) or steps < 2:
        raise ValueError(f"steps must be an int >= 2, got {steps!r}")
    config, out = study_config(data), Path(out)
    if objective == "next":
        return pretrain("next", steps, out, seed=seed, batch=batch, lr=lr, log_path=log_path, config=config)
    stage1 = out / "stage1-masked"
    pretrain("masked", steps // 2, stage1, seed=seed, batch=batch, lr=lr, log_path=log_path, config=config)
    return pretrain("tokenunify", steps - steps // 2, out, init=stage1, seed=seed, batch=batch, lr=lr,
                    log_path=log_path)


def _mean_std(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def summarise(runs: dict[str, list[str | Path]], n: int = 64) -> dict:
    """Evaluate every run folder: next-token MSE (with the mean, copy-last and linear baselines) and the roll-out.

    Returns per objective the per-seed numbers and their mean/std: next_mse, rollout (MSE per step), slope
    (`growth_slope`) and ratio (error at the last step / error at step 1).
    """
    out: dict = {"per_objective": {}}
    for name, folders in runs.items():
        models = {str(i): TokenUnifyModel.load(f) for i, f in enumerate(folders)}
        config = next(iter(models.values())).config
        start = ROLLOUT_START if config.data == "volumes" else 16
        length = min(config.num_tokens - start, 32)
        pred = evaluate_prediction(models, n=n)
        roll = evaluate_rollout(models, start=start, length=length, n=n)
        out["baselines"] = {"next_mse": {k: v["next_mse"] for k, v in pred.items() if k.startswith("baseline")},
                            "rollout": {k: v for k, v in roll.items() if k.startswith("baseline")}}
        per_seed = [{"folder": str(folders[int(i)]), "next_mse": pred[i]["next_mse"], "rollout": roll[i],
                     "slope": growth_slope(roll[i]), "ratio": roll[i][-1] / roll[i][0]} for i in models]
        out["per_objective"][name] = {
            "per_seed": per_seed,
            **{key: _mean_std([r[key] for r in per_seed]) for key in ("next_mse", "slope", "ratio")},
            "rollout_mean": [statistics.fmean(r["rollout"][j] for r in per_seed) for j in range(length)],
            "rollout_std": [statistics.stdev(r["rollout"][j] for r in per_seed) if len(per_seed) > 1 else 0.0
                            for j in range(length)],
        }
    return out


def format_tables(summary: dict, steps: tuple[int, ...] = (1, 2, 4, 6, 8, 10)) -> str:
    """The README's two markdown tables (next-token MSE; roll-out MSE per step and growth) from `summarise`."""
    objectives, base = summary["per_objective"], summary["baselines"]

    def pm(stat: dict, digits: int = 4) -> str:
        return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"

    lines = ["| predictor | next-token MSE (random k) |", "|---|---|"]
    lines += [f"| {name} | {value:.5f} |" for name, value in base["next_mse"].items()]
    lines += [f"| {name} (mean ± std over {len(r['per_seed'])} seeds) | {pm(r['next_mse'], 5)} |"
              for name, r in objectives.items()]
    length = len(next(iter(objectives.values()))["rollout_mean"])
    steps = tuple(s for s in steps if s <= length)
    lines += ["", "| predictor | " + " | ".join(f"step {s}" for s in steps) + " | slope of log MSE vs log step | "
              f"MSE step {length} / step 1 |", "|---|" + "---|" * (len(steps) + 2)]
    for name, errs in base["rollout"].items():
        lines.append(f"| {name} | " + " | ".join(f"{errs[s - 1]:.4f}" for s in steps)
                     + f" | {growth_slope(errs):.3f} | {errs[-1] / errs[0]:.2f} |")
    for name, r in objectives.items():
        cells = [f"{r['rollout_mean'][s - 1]:.4f} ± {r['rollout_std'][s - 1]:.4f}" for s in steps]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {pm(r['slope'], 3)} | {pm(r['ratio'], 2)} |")
    return "\n".join(lines)


def plot_summary(summary: dict, path: str | Path) -> None:
    """Roll-out MSE against step (log-log): baselines dashed, each objective's seed mean with a ± std band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, errs in summary["baselines"]["rollout"].items():
        ax.plot(range(1, len(errs) + 1), errs, linestyle="--", label=name)
    for name, r in summary["per_objective"].items():
        steps = range(1, len(r["rollout_mean"]) + 1)
        low = [m - s for m, s in zip(r["rollout_mean"], r["rollout_std"])]
        high = [m + s for m, s in zip(r["rollout_mean"], r["rollout_std"])]
        ax.plot(steps, r["rollout_mean"], label=f"{name} ({len(r['per_seed'])} seeds)")
        ax.fill_between(steps, low, high, alpha=0.25)
    ax.set(xscale="log", yscale="log", xlabel="roll-out step", ylabel="slice MSE",
           title="Roll-out error, moving-disc volumes")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _parse_runs(pairs: list[str]) -> dict[str, list[str]]:
    runs = {}
    for pair in pairs:
        name, sep, folders = pair.partition("=")
        if not sep or not name or not folders:
            raise ValueError(f"--runs takes name=folder1,folder2,... (e.g. next=runs/a,runs/b), got {pair!r}")
        missing = [f for f in folders.split(",") if not (Path(f) / "config.json").is_file()]
        if missing:
            raise ValueError(f"--runs {name}: no checkpoint (config.json) in {missing}; train them first with "
                             "`rollout_study train`")
        runs[name] = folders.split(",")
    return runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rollout_study", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="one pretraining run")
    t.add_argument("--objective", choices=STUDY_OBJECTIVES, required=True)
    t.add_argument("--data", choices=DATA_KINDS, default="volumes")
    t.add_argument("--steps", type=int, default=600, help="total optimiser steps (the mixture splits them 1:1)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--batch-size", type=int, default=32)
    t.add_argument("--lr", type=float, default=2e-3)
    t.add_argument("--out", required=True)
    t.add_argument("--log", help="JSON-lines training log")
    e = sub.add_parser("eval", help="next-token MSE and roll-out of trained runs, per objective over seeds")
    e.add_argument("--runs", nargs="+", required=True, help="name=folder1,folder2,... one entry per objective")
    e.add_argument("--n", type=int, default=64, help="held-out volumes")
    e.add_argument("--json", help="write the summary here")
    m = sub.add_parser("table", help="print the README tables from an eval --json summary")
    m.add_argument("summary", help="JSON written by eval --json")
    for p in (t, e, m):
        p.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    try:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
        if args.command == "train":
            train_run(args.objective, args.steps, args.seed, args.out, data=args.data, batch=args.batch_size,
                      lr=args.lr, log_path=args.log)
            return 0
        if args.command == "table":
            if not Path(args.summary).is_file():
                raise FileNotFoundError(f"{args.summary} does not exist; write it with `rollout_study eval --json`")
            print(format_tables(json.loads(Path(args.summary).read_text())))
            return 0
        if args.n < 2:
            raise ValueError(f"--n must be >= 2, got {args.n}")
        result = summarise(_parse_runs(args.runs), n=args.n)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text + "\n")
        plot_summary(result, Path(args.json).with_suffix(".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
