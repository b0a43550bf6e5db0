"""Methods that reduce vision tokens before the language model: drop or merge features per image, crop, tile or frame.

The engine hands a before-the-LLM method one sample at a time (`VisionTokens`: the vision features as they enter the
text model, where each came from, and what the vision tower said about them) and applies the `TokenPlan` it returns:
kept tokens stay in prompt order, and each kept token becomes the weighted average of the tokens merged into it.
Every decoder layer, layer 0 included, then sees the shorter prompt.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import torch

from .base import DropStage, ReductionMethod

if TYPE_CHECKING:  # pragma: no cover
    from mmreduce.adapters.base import TokenCell

__all__ = ["BeforeLLMMethod", "SignalRequest", "TokenPlan", "VisionTokens", "group_by_panel", "keep_count"]


@dataclass(frozen=True)
class SignalRequest:
    """A vision-tower signal a method needs: `kind` "cls_attention" (attention of the CLS query to each token's
    patches, mean over heads, summed over the token's patches) or "keys" (the token's patch keys, mean over heads
    and over its patches), at tower layer `layer` (negative counts from the end: -2 is the second-to-last layer)."""

    kind: str
    layer: int

    def __post_init__(self):
        if self.kind not in ("cls_attention", "keys"):
            raise ValueError(f"signal kind must be 'cls_attention' or 'keys', got {self.kind!r}")

    @property
    def key(self) -> str:
        return f"{self.kind}@{self.layer}"


@dataclass
class VisionTokens:
    """One sample's vision tokens as they enter the language model.

    Attributes:
        features: (n, D) the merged input embeddings at the vision positions, in prompt order.
        cells: one `TokenCell` per token (image, panel, row, col), or None when the adapter cannot tell.
        signals: `SignalRequest.key` -> (n,) or (n, C) per-token vision-tower signals the method asked for.
        seed: a per-sample value derived from the sample's own prompt tokens (for seeded methods).
    """

    features: torch.Tensor
    cells: list["TokenCell"] | None
    signals: dict[str, torch.Tensor] = field(default_factory=dict)
    seed: int = 0

    @property
    def count(self) -> int:
        return self.features.shape[0]


@dataclass
class TokenPlan:
    """What to do with one sample's n vision tokens.

    Attributes:
        keep: (n,) bool, the tokens that stay (in their prompt order).
        target: (n,) long, for every token the index of the kept token it is averaged into; a kept token targets
            itself; -1 discards the token.
        weight: (n,) float >= 0, each token's weight in its target's average (a kept token's own weight included).
        extra_flops: what computing the plan cost (similarity matrices, sorting), added to the stats' prefill FLOPs.
    """

    keep: torch.Tensor
    target: torch.Tensor
    weight: torch.Tensor
    extra_flops: float = 0.0

    @classmethod
    def select(cls, keep: torch.Tensor) -> "TokenPlan":
        """A plain drop: the `keep` (n,) bool tokens stay unchanged, the rest are discarded."""
        index = torch.arange(keep.shape[0], device=keep.device)
        return cls(keep, torch.where(keep, index, -1), keep.float())

    def check(self, count: int) -> None:
        """Raises ValueError unless the plan is well formed for `count` tokens (what the engine relies on)."""
        for name in ("keep", "target", "weight"):
            if tuple(getattr(self, name).shape) != (count,):
                raise ValueError(f"TokenPlan.{name} has shape {tuple(getattr(self, name).shape)}, expected ({count},)")
        index = torch.arange(count, device=self.keep.device)
        if bool(((self.target < -1) | (self.target >= count)).any()):
            raise ValueError(f"TokenPlan: targets must be -1 or a token index in [0, {count})")
        if not bool(torch.isfinite(self.weight).all()):
            raise ValueError("TokenPlan: weights must be finite")
        if not bool((self.target[self.keep] == index[self.keep]).all()):
            raise ValueError("TokenPlan: a kept token must target itself")
        merged = self.target >= 0
        if bool(merged.any()) and not bool(self.keep[self.target[merged]].all()):
            raise ValueError("TokenPlan: a token is merged into a token that is not kept")
        if bool((self.weight < 0).any()) or not bool((self.weight[self.keep] > 0).all()):
            raise ValueError("TokenPlan: weights must be >= 0 and > 0 on kept tokens")

    def to(self, device) -> "TokenPlan":
        """The plan with its tensors on `device` (methods may plan on the CPU for a model on a GPU)."""
        return TokenPlan(self.keep.to(device), self.target.to(device), self.weight.to(device), self.extra_flops)

    def merge_weights(self) -> torch.Tensor:
        """(k, n) the normalised weights: row j holds how the j-th kept token averages the n tokens (rows sum to 1)."""
        kept = self.keep.nonzero().flatten()  # (k,)
        slot = torch.full_like(self.target, -1)
        slot[kept] = torch.arange(kept.shape[0], device=kept.device)
        matrix = torch.zeros(kept.shape[0], self.target.shape[0], dtype=torch.float64, device=self.keep.device)
        merged = (self.target >= 0).nonzero().flatten()
        matrix[slot[self.target[merged]], merged] = self.weight[merged].double()
        return matrix / matrix.sum(dim=1, keepdim=True)

    def apply(self, features: torch.Tensor) -> torch.Tensor:
        """(n, D) features -> (k, D) kept tokens, each the weighted average of what was merged into it.

        A kept token that nothing was merged into is copied exactly (no arithmetic), so keep-all is bit-identical."""
        if self.keep.device != features.device:
            return self.to(features.device).apply(features)
        kept = self.keep.nonzero().flatten()  # (k,)
        merged_into = self.target.clone()
        merged_into[self.keep] = -1
        if not bool((merged_into >= 0).any()):
            return features[kept]
        weights = self.merge_weights().to(features.dtype)  # (k, n)
        out = weights @ features  # (k, D)
        receivers = torch.zeros(features.shape[0], dtype=torch.bool, device=features.device)
        receivers[merged_into[merged_into >= 0]] = True
        untouched = ~receivers[kept]
        out[untouched] = features[kept][untouched]
        return out


def keep_count(ratio: float, available: int) -> int:
    """⌈ratio·available⌉ with a tolerance for float error (0.25·576 gives 144), at least 1 (0 of 0) and at most
    `available`."""
    return min(available, max(1, math.ceil(ratio * available - 1e-9)))


def group_by_panel(cells: list["TokenCell"]) -> dict[tuple[int, int], list[int]]:
    """Token indices of each (image, panel), panels in the order they first appear (tokens in prompt order)."""
    groups: dict[tuple[int, int], list[int]] = {}
    for index, cell in enumerate(cells):
        groups.setdefault((cell.image, cell.panel), []).append(index)
    return groups


@dataclass
class BeforeLLMMethod(ReductionMethod):
    """Base of methods that reduce vision tokens before the language model.

    Subclasses override `plan` (one sample's pixel tokens -> a `TokenPlan`) and, if they read the vision tower,
    `signal_requests`. Tokens that cover no pixels (LLaVA-NeXT's newline tokens, DocOwl's end-of-crop token) are
    not shown to `plan`: they stay with an image only while every pixel token of that image stays unmerged, because
    the rows and crops they close no longer exist once the image is reduced.
    """

    before_llm: ClassVar[bool] = True
    #: Whether `plan` needs `VisionTokens.cells` (the family's token layout).
    needs_layout: ClassVar[bool] = False

    def stages(self, num_layers: int) -> list[DropStage]:
        return []

    def before_stage(self) -> "BeforeLLMMethod":
        return self

    def signal_requests(self) -> list[SignalRequest]:
        """The vision-tower signals `plan` reads (none by default)."""
        return []

    def plan(self, tokens: VisionTokens) -> TokenPlan:
        """One sample's pixel tokens -> what to keep and merge."""
        raise NotImplementedError

    def kept_tokens(self, available: int) -> int:
        """Tokens kept of `available` pixel tokens, as planned (methods with a `keep_ratio` field keep ⌈r·n⌉)."""
        ratio = getattr(self, "keep_ratio", None)
        return available if ratio is None else keep_count(ratio, available)

    def planned_counts(self, num_layers: int, initial: int) -> list[int]:
        return [self.kept_tokens(initial)] * num_layers

    def plan_sample(self, tokens: VisionTokens) -> TokenPlan:
        """`plan` on the pixel tokens, with the structural tokens (negative panels) kept or discarded as a whole."""
        count = tokens.count
        structural = torch.tensor([cell.panel < 0 for cell in tokens.cells], dtype=torch.bool) \
            if tokens.cells is not None else torch.zeros(count, dtype=torch.bool)
        if not bool(structural.any()):
            plan = self.plan(tokens).to("cpu")
            plan.check(count)
            return plan
        pixel = (~structural).nonzero().flatten()  # (p,)
        inner = self.plan(_subset(tokens, pixel.to(tokens.features.device))).to("cpu")
        inner.check(pixel.shape[0])
        keep = torch.zeros(count, dtype=torch.bool)
        target = torch.full((count,), -1, dtype=torch.long)
        weight = torch.zeros(count, dtype=inner.weight.dtype)
        keep[pixel] = inner.keep
        target[pixel] = torch.where(inner.target >= 0, pixel[inner.target.clamp(min=0)], -1)
        weight[pixel] = inner.weight
        intact = {cell.image for cell in tokens.cells} - {
            tokens.cells[int(i)].image for i in pixel[~inner.keep | _receives(inner)]
        }
        for index in structural.nonzero().flatten().tolist():
            if tokens.cells[index].image in intact:
                keep[index], target[index], weight[index] = True, index, 1.0
        plan = TokenPlan(keep, target, weight, inner.extra_flops)
        plan.check(count)
        return plan


def _subset(tokens: VisionTokens, index: torch.Tensor) -> VisionTokens:
    """The tokens at `index` (p,) of a sample, with their cells and signals."""
    cells = [tokens.cells[int(i)] for i in index] if tokens.cells is not None else None
    signals = {key: value[index] for key, value in tokens.signals.items()}
    return VisionTokens(tokens.features[index], cells, signals, tokens.seed)


def _receives(plan: TokenPlan) -> torch.Tensor:
    """(n,) bool: kept tokens that some other token is merged into."""
    out = torch.zeros_like(plan.keep)
    others = (plan.target >= 0) & ~plan.keep
    out[plan.target[others]] = True
    return out
