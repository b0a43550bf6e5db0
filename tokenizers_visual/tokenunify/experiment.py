"""TokenUnify experiments: pretraining runs, next-token / roll-out evaluation, few-label segmentation.

Data seeds: pretraining pool = data seed 0 (800 volumes), prediction test = data seed 7 (64 volumes),
segmentation labelled pool = data seed 11 (32 volumes; each fine-tuning seed draws its few labelled ones),
segmentation test = data seed 13 (16 volumes).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..training import seed_everything, train_steps
from .data import affinities, make_volumes
from .model import TokenUnifyConfig, TokenUnifyModel
from .rollout import rollout_errors
from .segment import segment_affinities, segmentation_scores
from .tokens import patchify, prefix_corrupt, random_token_corrupt, sample_prefix, unpatchify
from .volumes import make_moving_volumes

__all__ = ["evaluate_prediction", "evaluate_rollout", "finetune_segmentation", "fit_neighbour_regression",
           "ground_truth_ceiling", "neighbour_context", "pretrain", "unpatchify_affinities"]

POOL_SEED, TEST_SEED, SEG_POOL_SEED, SEG_TEST_SEED = 0, 7, 11, 13


def _pool(n: int, seed: int, config: TokenUnifyConfig) -> tuple[Tensor, Tensor]:
    if config.data == "volumes":
        return make_moving_volumes(n, tuple(config.volume), seed)
    return make_volumes(n, tuple(config.volume), seed)


def _reference_tokens(config: TokenUnifyConfig) -> Tensor:
    """(200, K, P) tokens of the first 200 pretraining volumes: what the mean-token and linear baselines fit."""
    return patchify(_pool(200, POOL_SEED, config)[0], config.patch)


def pretrain(objective: str, steps: int, out: str | Path, init: str | Path | None = None, seed: int = 0,
             batch: int = 32, lr: float = 2e-3, log_path: str | Path | None = None,
             config: TokenUnifyConfig | None = None, pool_size: int = 800) -> TokenUnifyModel:
    """Train `steps` steps of one objective ("masked", "next" or "tokenunify" = next + next-all) and save.

    The two-stage TokenUnify schedule is ``pretrain("masked", ...)`` then ``pretrain("tokenunify", init=...)``.
    """
    seed_everything(seed)
    model = TokenUnifyModel.load(init) if init else TokenUnifyModel(config or TokenUnifyConfig())
    history = json.loads((Path(init) / "config.json").read_text()).get("history", []) if init else []
    volumes, _ = _pool(pool_size, POOL_SEED, model.config)
    gen = torch.Generator().manual_seed(seed)

    def step(_i: int):
        idx = torch.randint(0, volumes.shape[0], (batch,), generator=gen)
        return model.loss(volumes[idx], objective, gen), {}

    model.train()
    t0 = time.time()
    train_steps(model.parameters(), step, steps, lr, warmup=min(50, steps // 4 + 1), betas=(0.9, 0.95),
                log_path=log_path, desc=f"tokenunify-{objective}")
    history = [*history, {"objective": objective, "steps": steps, "seed": seed, "batch": batch, "lr": lr,
                          "seconds": round(time.time() - t0)}]
    model.save(out, extra={"history": history})
    return model.eval()


def neighbour_context(x: Tensor, k: Tensor, grid: tuple[int, ...]) -> Tensor:
    """The causal neighbours of token k: one step back along each grid axis (previous token in the row, the one
    above, the one in the previous slab), zeros where that step leaves the grid, and a constant 1.

    x: (B, K, P) raster tokens of a (g0[, g1], g_last) token grid; k: (B,) positions -> (B, len(grid) * P + 1).
    Every neighbour precedes k in raster order, so a predictor built on them sees only the given prefix.
    """
    strides = [int(np.prod(grid[a + 1:])) for a in range(len(grid))]  # raster stride of each axis
    rows = torch.arange(x.shape[0])
    parts = []
    for axis in reversed(range(len(grid))):
        coord = (k // strides[axis]) % grid[axis]  # (B,)
        back = x[rows, (k - strides[axis]).clamp(min=0)]  # (B, P)
        parts.append(torch.where((coord > 0)[:, None], back, torch.zeros_like(back)))
    return torch.cat([*parts, x.new_ones(x.shape[0], 1)], dim=1)


def fit_neighbour_regression(x: Tensor, grid: tuple[int, ...], ridge: float = 1.0) -> Tensor:
    """Least squares (ridge) of every token k >= 1 on `neighbour_context`, over all volumes of x (B, K, P).

    Returns W (len(grid) * P + 1, P): the prediction of token k is neighbour_context(x, k, grid) @ W. A linear
    reference for how predictable the next token is from its prefix at all.
    """
    b, n_tokens, _ = x.shape
    k = torch.arange(1, n_tokens).repeat(b)  # (B * (K - 1),)
    rows = torch.arange(b).repeat_interleave(n_tokens - 1)
    context = neighbour_context(x[rows], k, grid)  # (B * (K - 1), C)
    target = x[rows, k]  # (B * (K - 1), P)
    gram = context.T @ context + ridge * torch.eye(context.shape[1])
    return torch.linalg.solve(gram, context.T @ target)


@torch.no_grad()
def evaluate_prediction(models: dict[str, TokenUnifyModel], n: int = 64, seed: int = 0) -> dict[str, dict]:
    """Held-out next-token MSE (next head, and pixel head at position k) and masked-token MSE per model,
    with copy-previous, mean-token and linear-neighbour baselines (`fit_neighbour_regression` on the pretraining
    pool). k ~ U{1..K-1} per volume from `seed`."""
    config = next(iter(models.values())).config
    test, _ = _pool(n, TEST_SEED, config)
    x = patchify(test, config.patch)  # (n, K, P)
    pool_tokens = _reference_tokens(config)  # (200, K, P)
    mean_token = pool_tokens.mean(dim=(0, 1))  # (P,) mean training token
    linear = fit_neighbour_regression(pool_tokens, config.grid)
    gen = torch.Generator().manual_seed(seed)
    k = sample_prefix(n, x.shape[1], gen)
    corrupted, target = prefix_corrupt(x, k, "noise", gen)
    masked, mask = random_token_corrupt(x, config.mask_ratio, "zero", gen)
    rows = torch.arange(n)
    out: dict[str, dict] = {
        "baseline_copy_previous": {"next_mse": F.mse_loss(x[rows, k - 1], target).item()},
        "baseline_mean_token": {"next_mse": F.mse_loss(mean_token.expand_as(target), target).item(),
                                "masked_mse": F.mse_loss(mean_token.expand_as(x[mask]), x[mask]).item()},
        "baseline_linear_neighbours": {"next_mse": F.mse_loss(neighbour_context(x, k, config.grid) @ linear, target).item()},
    }
    for name, model in models.items():
        model.eval()
        feats = model.features(corrupted)
        rec = model.reconstruct(masked)
        out[name] = {"next_mse": F.mse_loss(model.predict_next(corrupted, feats), target).item(),
                     "next_mse_pixel_head": F.mse_loss(model.reconstruct(corrupted, feats)[rows, k], target).item(),
                     "masked_mse": F.mse_loss(rec[mask], x[mask]).item()}
    return out


@torch.no_grad()
def evaluate_rollout(models: dict[str, TokenUnifyModel], start: int = 16, length: int = 32, n: int = 64,
                     seed: int = 0) -> dict[str, list[float]]:
    """Autoregressive roll-out: given tokens < start, predict token start, write it in, predict the next, ...

    Returns per model the MSE at roll-out steps 1..length (averaged over n held-out volumes), plus the
    copy-last-given-token baseline and the linear-neighbour predictor (`fit_neighbour_regression`) rolled out.
    """
    config = next(iter(models.values())).config
    if not 1 <= start < start + length <= config.num_tokens:
        raise ValueError(f"need 1 <= start < start + length <= {config.num_tokens}, got start={start}, length={length}")
    test, _ = _pool(n, TEST_SEED, config)
    x = patchify(test, config.patch)
    gen = torch.Generator().manual_seed(seed)
    k0 = torch.full((n,), start)
    base, _ = prefix_corrupt(x, k0, "noise", gen)
    out = {"baseline_copy_last": [F.mse_loss(x[:, start - 1], x[:, start + j]).item() for j in range(length)]}
    # The linear-neighbour predictor rolled out the same way: its own predictions become its neighbours.
    linear = fit_neighbour_regression(_reference_tokens(config), config.grid)
    seq, errs = x.clone(), []
    for j in range(length):
        position = torch.full((n,), start + j)
        seq[:, start + j] = neighbour_context(seq, position, config.grid) @ linear  # (n, P)
        errs.append(F.mse_loss(seq[:, start + j], x[:, start + j]).item())
    out["baseline_linear_neighbours"] = errs
    for name, model in models.items():
        model.eval()
        out[name] = rollout_errors(lambda seq, _position, m=model: m.predict_next(seq), base, x, start, length)
    return out


def unpatchify_affinities(logits: Tensor, config: TokenUnifyConfig) -> Tensor:
    """(B, K, nd * P) -> (B, nd, *volume): channel-major split of each token's outputs, then unpatchify."""
    b, k, _ = logits.shape
    nd = len(config.volume)
    per_channel = logits.reshape(b, k, nd, config.patch_voxels).permute(0, 2, 1, 3)  # (B, nd, K, P)
    flat = per_channel.reshape(b * nd, k, config.patch_voxels)
    return unpatchify(flat, tuple(config.volume), tuple(config.patch)).reshape(b, nd, *config.volume)


def finetune_segmentation(init: str | Path | None, seed: int, steps: int = 300, n_labelled: int = 4, batch: int = 4,
                          lr: float = 1e-3, n_test: int = 16, config: TokenUnifyConfig | None = None,
                          log_path: str | Path | None = None) -> dict[str, float]:
    """Fine-tune backbone + affinity head on n_labelled volumes (chosen by `seed`); VOI/ARAND on n_test volumes.

    The loss is class-balanced BCE on the nd affinity channels (boundary edges are rare).
    """
    seed_everything(seed)
    model = TokenUnifyModel.load(init) if init else TokenUnifyModel(config or TokenUnifyConfig())
    config = model.config
    nd = len(config.volume)
    pool, pool_labels = _pool(32, SEG_POOL_SEED, config)
    pick = torch.randperm(32, generator=torch.Generator().manual_seed(seed))[:n_labelled]
    images, target = pool[pick], affinities(pool_labels[pick], nd)  # (m, *V), (m, nd, *V)
    pos = target.mean()
    gen = torch.Generator().manual_seed(seed + 1)

    def step(_i: int):
        idx = torch.randint(0, n_labelled, (batch,), generator=gen)
        vol, aff = images[idx], target[idx]
        logits = unpatchify_affinities(model.affinity_logits(patchify(vol, config.patch)), config)
        weight = torch.where(aff > 0.5, 0.5 / pos, 0.5 / (1 - pos))
        return F.binary_cross_entropy_with_logits(logits, aff, weight=weight), {}

    model.train()
    train_steps(model.parameters(), step, steps, lr, warmup=20, log_path=log_path, desc=f"seg-seed{seed}")
    model.eval()
    test, test_labels = _pool(n_test, SEG_TEST_SEED, config)
    scores = []
    with torch.no_grad():
        aff = torch.sigmoid(unpatchify_affinities(model.affinity_logits(patchify(test, config.patch)), config))
    for i in range(n_test):
        seg = segment_affinities(aff[i].numpy())
        scores.append(segmentation_scores(test_labels[i].numpy(), seg))
    return {key: float(np.mean([s[key] for s in scores])) for key in scores[0]}


def ground_truth_ceiling(config: TokenUnifyConfig | None = None, n_test: int = 16) -> dict[str, float]:
    """VOI/ARAND of the post-processing itself: ground-truth affinities through the same watershed."""
    config = config or TokenUnifyConfig()
    _, labels = _pool(n_test, SEG_TEST_SEED, config)
    scores = [segmentation_scores(lab.numpy(), segment_affinities(affinities(lab, len(config.volume)).numpy()))
              for lab in labels]
    return {key: float(np.mean([s[key] for s in scores])) for key in scores[0]}


# ----- CLI glue (called from tokenizers_visual/cli.py) -----
def pretrain_cli(args: argparse.Namespace) -> None:
    if args.objective == "tokenunify" and not args.init:
        # Full two-stage schedule in one call: random-token stage, then next + next-all.
        stage1 = Path(args.out) / "stage1-masked"
        pretrain("masked", args.steps, stage1, seed=args.seed, batch=args.batch_size, lr=args.lr, log_path=args.log)
        pretrain("tokenunify", args.steps, args.out, init=stage1, seed=args.seed, batch=args.batch_size, lr=args.lr,
                 log_path=args.log)
    else:
        pretrain(args.objective, args.steps, args.out, init=args.init, seed=args.seed, batch=args.batch_size,
                 lr=args.lr, log_path=args.log)


def _named(pairs: list[str]) -> dict[str, str]:
    out = {}
    for p in pairs:
        if "=" not in p:
            raise SystemExit(f"--checkpoints takes name=folder pairs, got {p!r}")
        name, folder = p.split("=", 1)
        out[name] = folder
    return out


def eval_cli(args: argparse.Namespace) -> None:
    named = _named(args.checkpoints or [])
    if args.what in ("prediction", "rollout"):
        if not named:
            raise SystemExit("--checkpoints name=folder ... is required")
        models = {name: TokenUnifyModel.load(folder) for name, folder in named.items()}
        result = evaluate_prediction(models) if args.what == "prediction" else evaluate_rollout(models)
    else:
        # name=folder pairs; the folder "scratch" means no pretraining.
        named = named or {"scratch": "scratch"}
        result = {"ground_truth_affinities": ground_truth_ceiling()}
        for name, folder in named.items():
            runs = [finetune_segmentation(None if folder == "scratch" else folder, seed, steps=args.finetune_steps)
                    for seed in args.seeds]
            result[name] = {"per_seed": runs, "seeds": args.seeds,
                            **{f"{key}_mean": float(np.mean([r[key] for r in runs])) for key in runs[0]},
                            **{f"{key}_std": float(np.std([r[key] for r in runs])) for key in runs[0]}}
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text + "\n")
        if args.what == "rollout":
            plot_rollout(result, Path(args.json).with_suffix(".png"))


def plot_rollout(result: dict[str, list[float]], path: Path) -> None:
    """Roll-out MSE against step (log-log), one line per model: the figure of the README."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, errs in result.items():
        ax.plot(range(1, len(errs) + 1), errs, label=name, linestyle="--" if name.startswith("baseline") else "-")
    ax.set(xscale="log", yscale="log", xlabel="roll-out step", ylabel="token MSE", title="TokenUnify roll-out error")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

