"""Token-level Correlation-guided Compression (TCC; Zhang et al., arXiv 2407.14439) for cropping models.

A cropping model (LLaVA-NeXT's anyres crops, InternVL's tiles, DocOwl's shape-adaptive crops) spends the same number
of tokens on every crop, although a crop of empty paper says far less than a crop full of text. TCC measures how much
each panel (crop, tile, global image) holds and splits the sample's budget accordingly, before the language model:

1. Information density of a panel: the cosine similarity of its tokens' vision-tower keys; a token is redundant when
   more than `count_limit` of the panel's tokens resemble it (similarity > `tau`); density = 1 - redundant share.
   The budget (⌈keep_ratio·n⌉ of the n pixel tokens) is split in proportion to density, at least one token per
   panel and never more than a panel has.
2. Inside a panel: tokens whose deep-layer CLS attention is an IQR outlier are kept first; the rest of the panel's
   budget is sampled without replacement, with probability proportional to shallow-layer CLS attention, seeded
   by the sample's own prompt (`VisionTokens.seed`): a sample draws the same tokens alone, in a batch, in a beam.
3. Each dropped token is averaged into the kept token of its panel whose key it resembles most, weighted by that
   similarity (a kept token weighs 1, its similarity with itself): a near-duplicate counts almost fully, a token
   that resembles nothing kept barely moves it, and one with similarity <= 0 is discarded.

The paper's code and thresholds were not published; `tau`, `count_limit` and `iqr_k` default to the values chosen on
the `docs` benchmark's calibration split (docs/RESULTS.md, "TCC defaults"). The algorithm is the pure functions
below; `TCC.plan` only applies them panel by panel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .base import check_ratio, register_method
from .before import BeforeLLMMethod, SignalRequest, TokenPlan, VisionTokens, group_by_panel, keep_count

__all__ = ["TCC", "aggregate_into_kept", "allocate_budget", "cosine_similarity", "information_density",
           "iqr_outliers", "sample_without_replacement", "select_in_panel"]


def cosine_similarity(keys: torch.Tensor) -> torch.Tensor:
    """(p, C) keys -> (p, p) float64 cosine similarity (a zero key is similar to nothing, itself included)."""
    unit = keys.double() / keys.double().norm(dim=-1, keepdim=True).clamp(min=1e-12)  # (p, C)
    return unit @ unit.T


def information_density(similarity: torch.Tensor, tau: float, count_limit: float) -> float:
    """1 - the share of redundant tokens of one panel.

    Args:
        similarity: (p, p) pairwise similarity of the panel's tokens.
        tau: two tokens are similar when their similarity exceeds tau.
        count_limit: a token is redundant when more than count_limit·p other tokens are similar to it.

    Returns:
        density in [0, 1]: 0 when every token has many near-duplicates, 1 when none has.
    """
    count = similarity.shape[0]
    others = ~torch.eye(count, dtype=torch.bool, device=similarity.device)  # (p, p) a token is not its own twin
    similar_counts = ((similarity > tau) & others).sum(dim=1)  # (p,)
    redundant = similar_counts > count_limit * count
    return 1.0 - redundant.double().mean().item()


def allocate_budget(density: torch.Tensor, sizes: torch.Tensor, total: int) -> torch.Tensor:
    """Split `total` tokens across panels in proportion to their density, at least 1 and at most its size each.

    The real-valued share of panel i is clamp(λ·density_i, 1, size_i), with the one λ that makes the shares sum to
    `total` (what a panel cannot take goes to the others in proportion to their densities); integers follow by
    largest remainder (ties to the earlier panel). Panels of density 0 get 1 token, unless the others are full:
    then the rest is split evenly among them.

    Args:
        density: (P,) float >= 0.
        sizes: (P,) long >= 1 tokens each panel has.
        total: tokens to keep, in [P, sum(sizes)].

    Returns:
        (P,) long budgets, 1 <= budget_i <= size_i, summing exactly to `total`.
    """
    sizes = sizes.long()
    panels, available = sizes.shape[0], int(sizes.sum())
    if panels == 0 or bool((sizes < 1).any()):
        raise ValueError(f"every panel needs at least one token, got sizes {sizes.tolist()}")
    if tuple(density.shape) != (panels,) or bool((density < 0).any()) or not bool(torch.isfinite(density).all()):
        raise ValueError(f"density must be {panels} finite values >= 0, got {density.tolist()}")
    if total > available:
        raise ValueError(f"a budget of {total} tokens is more than the {available} the panels have; keep at most "
                         f"{available}")
    if total < panels:
        raise ValueError(f"a budget of {total} tokens cannot give each of the {panels} panels one token; keep at "
                         f"least {panels}")
    density = density.double()
    positive = density > 0
    full_positive = int(sizes[positive].sum()) + int((~positive).sum())
    if total >= full_positive:
        # Every informative panel is full: what is left goes evenly to the panels of density 0.
        out = torch.where(positive, sizes, torch.ones_like(sizes))
        zero = (~positive).nonzero().flatten()
        if total > full_positive:
            out[zero] = allocate_budget(torch.ones(zero.shape[0], dtype=torch.float64), sizes[zero],
                                        total - int(sizes[positive].sum()))
        return out

    def shares(scale: float) -> torch.Tensor:  # (P,) real-valued budgets at multiplier λ = scale
        return torch.minimum(torch.maximum(scale * density, torch.ones_like(density)), sizes.double())

    # The sum of the shares is piecewise linear in λ, bending where a panel leaves its floor (λ = 1/d) or reaches
    # its size (λ = size/d): find the segment where it reaches `total` and solve there.
    bends = torch.cat([1.0 / density[positive], sizes[positive].double() / density[positive]]).unique()  # sorted
    low, low_sum = 0.0, float(panels)
    scale = float(bends[-1])
    for bend in bends.tolist():
        bend_sum = float(shares(bend).sum())
        if bend_sum >= total:
            scale = low + (total - low_sum) * (bend - low) / (bend_sum - low_sum) if bend_sum > low_sum else bend
            break
        low, low_sum = bend, bend_sum
    quota = shares(scale)  # (P,) sums to `total` up to rounding
    out = quota.floor().long().clamp(min=1)
    out = torch.minimum(out, sizes)
    remainder = quota - out.double()
    remainder[out >= sizes] = -1.0  # a full panel takes no more
    order = torch.sort(-remainder, stable=True).indices  # largest remainder first, ties to the earlier panel
    missing = total - int(out.sum())
    out[order[:missing]] += 1
    return out


def iqr_outliers(scores: torch.Tensor, iqr_k: float) -> torch.Tensor:
    """(p,) bool: scores above Q3 + iqr_k·(Q3 - Q1) (quartiles by linear interpolation, numpy's default)."""
    quartiles = torch.quantile(scores.double(), torch.tensor([0.25, 0.75], dtype=torch.float64))
    q1, q3 = float(quartiles[0]), float(quartiles[1])
    return scores.double() > q3 + iqr_k * (q3 - q1)


def sample_without_replacement(weights: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """(count,) distinct indices drawn one after another with probability proportional to (p,) `weights` >= 0.

    A weight of 0 gets a tiny floor so that a panel whose attention vanished on some tokens can still fill its
    budget (they are drawn last)."""
    if count == 0:
        return torch.zeros(0, dtype=torch.long)
    probabilities = weights.double().clamp(min=0)
    total = float(probabilities.sum())
    probabilities = probabilities + (total * 1e-9 if total > 0 else 1.0)
    return torch.multinomial(probabilities, count, replacement=False, generator=generator)


def select_in_panel(deep_attention: torch.Tensor, shallow_attention: torch.Tensor, budget: int, iqr_k: float,
                    generator: torch.Generator) -> torch.Tensor:
    """(p,) bool, exactly `budget` tokens of one panel: the deep-attention IQR outliers first (the most attended
    ones when there are more outliers than budget), the rest sampled in proportion to shallow attention.

    Args:
        deep_attention, shallow_attention: (p,) CLS attention to each token at a deep and a shallow tower layer.
    """
    count = deep_attention.shape[0]
    keep = torch.zeros(count, dtype=torch.bool)
    outliers = iqr_outliers(deep_attention, iqr_k).nonzero().flatten()  # (o,)
    if outliers.shape[0] > budget:
        order = torch.sort(deep_attention[outliers].double(), descending=True, stable=True).indices
        outliers = outliers[order[:budget]]
    keep[outliers] = True
    rest = (~keep).nonzero().flatten()  # (p - o,)
    drawn = sample_without_replacement(shallow_attention[rest], budget - outliers.shape[0], generator)
    keep[rest[drawn]] = True
    return keep


def aggregate_into_kept(similarity: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each token of one panel goes, and its weight in that kept token's average.

    Each dropped token goes to the kept token it is most similar to (ties to the earlier one), weighted by that
    similarity; a kept token weighs 1 (its similarity with itself); a dropped token whose best similarity is <= 0
    is discarded. Weights are normalised per kept token, so each kept token's weights sum to 1.

    Args:
        similarity: (p, p) pairwise similarity.
        keep: (p,) bool, at least one True.

    Returns:
        target: (p,) long panel index of the kept token each token is averaged into (itself if kept; -1 discarded);
        weight: (p,) float64, 0 on discarded tokens.
    """
    kept = keep.nonzero().flatten()  # (k,)
    best, slot = similarity[:, kept].double().max(dim=1)  # (p,) max returns the first of equal values
    target = torch.where(keep, torch.arange(keep.shape[0]), kept[slot])
    raw = torch.where(keep, torch.ones_like(best), best.clamp(min=0))  # (p,)
    target = torch.where(raw > 0, target, -1)
    group_sum = torch.zeros(keep.shape[0], dtype=torch.float64).index_add_(0, target[target >= 0], raw[target >= 0])
    weight = torch.where(target >= 0, raw / group_sum[target.clamp(min=0)], 0.0)
    return target, weight


@register_method("tcc")
@dataclass
class TCC(BeforeLLMMethod):
    """Token-level Correlation-guided Compression: a budget per crop from its information density, then CLS-attention
    outliers plus attention-weighted sampling inside each crop, dropped tokens merged into the most similar kept one.

    Parameters:
        keep_ratio: r in (0, 1]; each sample keeps ⌈r·n⌉ of its n pixel tokens (1.0 keeps everything and reads
            nothing, on any family).
        tau: cosine similarity in [-1, 1] above which two tokens' keys count as alike.
        count_limit: share in [0, 1] of the panel's tokens; a token with more alike tokens than that is redundant.
        iqr_k: k >= 0 of the outlier rule (deep CLS attention > Q3 + k·IQR).
        deep_layer: vision-tower layer of the CLS attention that picks outliers (negative counts from the end).
        shallow_layer: vision-tower layer of the CLS attention that tokens are sampled by.
        corr_layer: vision-tower layer whose keys give the similarities (density and merging).

    A sample whose images each come as one panel (LLaVA-1.5, Qwen2-VL images) has no crops to split a budget
    across: TCC refuses it (use visionzip or pool there).
    """

    keep_ratio: float = 0.25
    tau: float = 0.9
    count_limit: float = 0.1
    iqr_k: float = 1.5
    deep_layer: int = -2
    shallow_layer: int = 0
    corr_layer: int = -2

    def __post_init__(self):
        check_ratio("TCC", "keep_ratio", self.keep_ratio)
        if not _is_number(self.tau) or not -1 <= self.tau <= 1:
            raise ValueError(f"TCC.tau must be a cosine similarity in [-1, 1], got {self.tau!r}")
        check_ratio("TCC", "count_limit", self.count_limit, allow_zero=True)
        if not _is_number(self.iqr_k) or not 0 <= self.iqr_k < math.inf:
            raise ValueError(f"TCC.iqr_k must be a finite number >= 0 (1.5 is Tukey's rule), got {self.iqr_k!r}")
        for name in ("deep_layer", "shallow_layer", "corr_layer"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"TCC.{name} must be an integer vision-tower layer (negative counts from the end), "
                                 f"got {value!r}")

    @classmethod
    def example(cls, num_layers: int, keep_all: bool = False) -> TCC:
        return cls(keep_ratio=1.0 if keep_all else 0.25)

    @property
    def keeps_all(self) -> bool:
        return self.keep_ratio >= 1

    @property
    def needs_layout(self) -> bool:  # keep-all needs nothing, so it runs on every family
        return not self.keeps_all

    def signal_requests(self) -> list[SignalRequest]:
        if self.keeps_all:
            return []
        requests = [SignalRequest("keys", self.corr_layer), SignalRequest("cls_attention", self.deep_layer),
                    SignalRequest("cls_attention", self.shallow_layer)]
        return list(dict.fromkeys(requests))

    def plan(self, tokens: VisionTokens) -> TokenPlan:
        count = tokens.count
        if self.keeps_all:
            return TokenPlan.select(torch.ones(count, dtype=torch.bool))
        groups = group_by_panel(tokens.cells)
        panels_of: dict[int, int] = {}
        for image, _ in groups:
            panels_of[image] = panels_of.get(image, 0) + 1
        if all(number == 1 for number in panels_of.values()):
            raise ValueError("tcc allocates a budget across crops; this model gives one panel per image (no crops or "
                             "tiles, as LLaVA-1.5 and Qwen2-VL images); use visionzip or pool")
        # Plans are made on the CPU (small per-panel matrices, a CPU generator for the draws).
        keys = tokens.signals[SignalRequest("keys", self.corr_layer).key].cpu()  # (n, C)
        deep = tokens.signals[SignalRequest("cls_attention", self.deep_layer).key].cpu()  # (n,)
        shallow = tokens.signals[SignalRequest("cls_attention", self.shallow_layer).key].cpu()  # (n,)
        members = [torch.tensor(index) for index in groups.values()]  # per panel, (p,) token indices
        total = keep_count(self.keep_ratio, count)
        if total < len(members):
            raise ValueError(f"tcc keeps at least one token of each of the sample's {len(members)} panels, but "
                             f"keep_ratio={self.keep_ratio} keeps {total} of its {count} tokens; raise keep_ratio to "
                             f"at least {len(members) / count:.3f}")
        similarities = [cosine_similarity(keys[index]) for index in members]  # per panel, (p, p)
        density = torch.tensor([information_density(s, self.tau, self.count_limit) for s in similarities])
        budgets = allocate_budget(density, torch.tensor([len(index) for index in members]), total)  # (P,)
        generator = torch.Generator().manual_seed(int(tokens.seed))
        keep = torch.zeros(count, dtype=torch.bool)
        target = torch.full((count,), -1, dtype=torch.long)
        weight = torch.zeros(count, dtype=torch.float64)
        for index, similarity, budget in zip(members, similarities, budgets.tolist()):
            chosen = select_in_panel(deep[index], shallow[index], budget, self.iqr_k, generator)  # (p,)
            local_target, local_weight = aggregate_into_kept(similarity, chosen)
            keep[index] = chosen
            target[index] = torch.where(local_target >= 0, index[local_target.clamp(min=0)], -1)
            weight[index] = local_weight
        # Similarities: 2·p²·C per panel; the weighted averages: 2·n·D.
        flops = sum(2.0 * len(index) ** 2 * keys.shape[1] for index in members) + 2.0 * count * tokens.features.shape[1]
        return TokenPlan(keep, target, weight.float(), extra_flops=flops)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)
