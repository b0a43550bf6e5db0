"""PyramidDrop (Xing et al., CVPR 2025, arXiv 2410.17247): drops at several depths, each ranked by that layer."""

from __future__ import annotations

from dataclasses import dataclass

from .base import DropStage, ReductionMethod, check_layer, check_ratio, register_method

__all__ = ["PyramidDrop", "default_pdrop_layers"]


def default_pdrop_layers(num_layers: int) -> tuple[int, ...]:
    """The paper's (8, 16, 24) for 32 layers, scaled to `num_layers` (quarters of the depth, each >= 1)."""
    layers = sorted({max(1, round(num_layers * quarter / 4)) for quarter in (1, 2, 3)})
    return tuple(layer for layer in layers if layer < num_layers)


@register_method("pdrop")
@dataclass
class PyramidDrop(ReductionMethod):
    """At each layer ℓ in `layers`, keep ⌈λ·n⌉ of the n surviving vision tokens, ranked by the attention of the last
    prompt token computed with layer ℓ's own norm, q/k and RoPE (softmax over all surviving keys, mean over heads).

    Parameters:
        layers: drop layers, strictly increasing; None scales the paper's (8, 16, 24)/32 to the model's depth.
        keep_ratio: λ in (0, 1].
    """

    layers: tuple[int, ...] | None = None
    keep_ratio: float = 0.5

    def __post_init__(self):
        if self.layers is not None:
            if isinstance(self.layers, int) or not all(isinstance(x, int) for x in self.layers):
                raise ValueError(f"PyramidDrop.layers must be a sequence of integers, got {self.layers!r}")
            self.layers = tuple(self.layers)
            if not self.layers:
                raise ValueError("PyramidDrop.layers must not be empty")
            for layer in self.layers:
                check_layer("PyramidDrop", "layers", layer)
            if list(self.layers) != sorted(set(self.layers)):
                raise ValueError(f"PyramidDrop.layers must be strictly increasing, got {self.layers}")
        check_ratio("PyramidDrop", "keep_ratio", self.keep_ratio)

    @classmethod
    def example(cls, num_layers: int, keep_all: bool = False) -> "PyramidDrop":
        if keep_all:
            return cls(layers=tuple(range(1, num_layers, 2)), keep_ratio=1.0)
        return cls(keep_ratio=0.5)

    def stages(self, num_layers: int) -> list[DropStage]:
        layers = self.layers if self.layers is not None else default_pdrop_layers(num_layers)
        return [DropStage(score_layer=layer, apply_layer=layer, ratio=self.keep_ratio) for layer in layers]
