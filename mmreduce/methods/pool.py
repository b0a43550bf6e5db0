"""Average-pooling the feature grid of every image, crop, tile or frame: the image-downsampling baseline that
VTC-Bench (arXiv 2510.07143) found to beat many published compression methods. Every comparison carries it."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .base import check_ratio, register_method
from .before import BeforeLLMMethod, TokenPlan, VisionTokens, group_by_panel

__all__ = ["Pool", "pool_windows"]


def pool_windows(rows: torch.Tensor, cols: torch.Tensor, keep_ratio: float) -> torch.Tensor:
    """Window id of every token of one panel when its grid is pooled to about `keep_ratio` of its cells.

    Args:
        rows, cols: (p,) long grid cell of each token (the panel's grid is max(rows)+1 x max(cols)+1).
        keep_ratio: the pooled grid is round(R·√r) x round(C·√r) (at least 1 x 1) non-overlapping windows of
            near-equal size: a 16 x 16 grid at 0.25 gives 8 x 8 windows of 2 x 2.

    Returns:
        (p,) long window id, row-major over the pooled grid.
    """
    grid_rows, grid_cols = int(rows.max()) + 1, int(cols.max()) + 1
    scale = math.sqrt(keep_ratio)
    out_rows = max(1, min(grid_rows, round(grid_rows * scale)))
    out_cols = max(1, min(grid_cols, round(grid_cols * scale)))
    return (rows * out_rows // grid_rows) * out_cols + cols * out_cols // grid_cols


@register_method("pool")
@dataclass
class Pool(BeforeLLMMethod):
    """Average-pool each panel's token grid to about `keep_ratio` of its tokens (2 x 2 windows at 0.25, 3 x 3 at
    1/9); each window becomes one token, placed where its first token was.

    Parameters:
        keep_ratio: r in (0, 1]; the pooled grid has round(R·√r) x round(C·√r) cells.
    """

    keep_ratio: float = 0.25
    needs_layout = True

    def __post_init__(self):
        check_ratio("Pool", "keep_ratio", self.keep_ratio)

    @classmethod
    def example(cls, num_layers: int, keep_all: bool = False) -> "Pool":
        return cls(keep_ratio=1.0 if keep_all else 0.25)

    def kept_tokens(self, available: int) -> int:
        side = math.isqrt(available)
        if side * side != available:
            return super().kept_tokens(available)
        pooled = max(1, min(side, round(side * math.sqrt(self.keep_ratio))))
        return pooled * pooled

    def plan(self, tokens: VisionTokens) -> TokenPlan:
        count = tokens.count
        target = torch.empty(count, dtype=torch.long)
        for members in group_by_panel(tokens.cells).values():
            index = torch.tensor(members)
            rows = torch.tensor([tokens.cells[i].row for i in members])
            cols = torch.tensor([tokens.cells[i].col for i in members])
            window = pool_windows(rows, cols, self.keep_ratio)  # (p,)
            for value in window.unique():
                inside = index[window == value]
                target[inside] = inside.min()
        keep = target == torch.arange(count)
        return TokenPlan(keep, target, torch.ones(count), extra_flops=float(count * tokens.features.shape[1]))
