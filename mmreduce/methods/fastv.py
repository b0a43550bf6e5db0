"""FastV (Chen et al., ECCV 2024, arXiv 2403.06764): one drop after layer K-1, ranked by layer K-1's attention."""

from __future__ import annotations

from dataclasses import dataclass

from .base import DropStage, ReductionMethod, check_layer, check_ratio, register_method

__all__ = ["FastV"]


@register_method("fastv")
@dataclass
class FastV(ReductionMethod):
    """Keep the ⌈keep_ratio·n⌉ vision tokens that the last prompt token attends to most at layer K-1.

    Parameters:
        layer: K, the first layer that sees only the kept tokens (the paper's K; >= 1).
        keep_ratio: r in (0, 1]; the paper's R = 1 - r.
    """

    layer: int = 2
    keep_ratio: float = 0.5

    def __post_init__(self):
        check_layer("FastV", "layer", self.layer)
        check_ratio("FastV", "keep_ratio", self.keep_ratio)

    @classmethod
    def example(cls, num_layers: int, keep_all: bool = False) -> "FastV":
        if keep_all:
            return cls(layer=1, keep_ratio=1.0)
        return cls(layer=min(2, num_layers - 1), keep_ratio=0.25)

    def stages(self, num_layers: int) -> list[DropStage]:
        return [DropStage(score_layer=self.layer - 1, apply_layer=self.layer, ratio=self.keep_ratio)]
