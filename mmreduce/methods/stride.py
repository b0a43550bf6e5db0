"""A uniform per-panel budget: keep evenly spaced tokens of every image, crop, tile or frame (the baseline that
budget-allocating methods such as TCC must beat)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import check_ratio, register_method
from .before import BeforeLLMMethod, TokenPlan, VisionTokens, group_by_panel, keep_count

__all__ = ["Stride", "evenly_spaced"]


def evenly_spaced(available: int, keep: int) -> torch.Tensor:
    """(keep,) sorted indices in [0, available) spread evenly: the middle of each of `keep` equal runs."""
    return ((torch.arange(keep, dtype=torch.float64) + 0.5) * available / keep).long()


@register_method("stride")
@dataclass
class Stride(BeforeLLMMethod):
    """Keep ⌈keep_ratio·p⌉ evenly spaced tokens (in prompt order) of every panel of p tokens; merge nothing.

    Parameters:
        keep_ratio: r in (0, 1], the same share of every panel.
    """

    keep_ratio: float = 0.25
    needs_layout = True  # the panels (and the newline / end-of-crop tokens that are not pixels) come from it

    def __post_init__(self):
        check_ratio("Stride", "keep_ratio", self.keep_ratio)

    @classmethod
    def example(cls, num_layers: int, keep_all: bool = False) -> "Stride":
        return cls(keep_ratio=1.0 if keep_all else 0.25)

    def plan(self, tokens: VisionTokens) -> TokenPlan:
        groups = group_by_panel(tokens.cells) if tokens.cells is not None else {(0, 0): list(range(tokens.count))}
        keep = torch.zeros(tokens.count, dtype=torch.bool)
        for members in groups.values():
            chosen = evenly_spaced(len(members), keep_count(self.keep_ratio, len(members)))
            keep[torch.tensor(members)[chosen]] = True
        return TokenPlan.select(keep)
