"""Uniformly random vision tokens: the floor every method must beat."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import DropStage, ReductionMethod, ScoreContext, check_layer, check_ratio, register_method
from .schedule import Schedule

__all__ = ["Random"]


@register_method("random")
@dataclass
class Random(ReductionMethod):
    """Keep a seeded uniformly random subset of the vision tokens.

    The draw is seeded by `seed`, the layer and the sample's own tokens, so a sample gets the same tokens alone or
    in any batch (and every beam of a sample agrees).

    Parameters:
        layer: first layer that sees only the kept tokens (when `keep` is None).
        keep_ratio: fraction kept at `layer` (when `keep` is None).
        seed: base seed.
        keep: a per-layer schedule to mirror instead (same meaning as `Schedule.keep`).
    """

    layer: int = 2
    keep_ratio: float = 0.5
    seed: int = 0
    keep: tuple[float, ...] | None = None

    def __post_init__(self):
        check_layer("Random", "layer", self.layer)
        check_ratio("Random", "keep_ratio", self.keep_ratio)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"Random.seed must be an integer, got {self.seed!r}")
        self._schedule = Schedule(keep=self.keep) if self.keep is not None else None
        if self._schedule is not None:
            self.keep = self._schedule.keep

    @classmethod
    def example(cls, num_layers: int, keep_all: bool = False) -> "Random":
        if keep_all:
            return cls(layer=1, keep_ratio=1.0)
        return cls(layer=min(3, num_layers - 1), keep_ratio=0.3, seed=7)

    def stages(self, num_layers: int) -> list[DropStage]:
        if self._schedule is not None:
            return self._schedule.stages(num_layers)
        return [DropStage(score_layer=self.layer, apply_layer=self.layer, ratio=self.keep_ratio)]

    def check_inputs(self, initial_vision: torch.Tensor) -> None:
        if self._schedule is not None:
            self._schedule.check_inputs(initial_vision)

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        # Draws are indexed by the position inside the sample, not in the (padded) batch stream.
        relative = ctx.relative_position.clamp(min=0).cpu()  # (B, T)
        length = int(relative.max()) + 1
        scores = torch.empty(relative.shape)
        for row in range(relative.shape[0]):
            generator = torch.Generator().manual_seed(
                (self.seed * 1_000_003 + int(ctx.sample_seed[row]) * 101 + ctx.layer_idx) % (2**63 - 1)
            )
            scores[row] = torch.rand(length, generator=generator)[relative[row]]
        return scores.to(ctx.hidden.device)
