"""A throw-away reduction method, loaded as a pytest plugin: `pytest -p tests.support.throwaway_method ...`.

Importing this module registers `throwaway_every_other`; tests/core/test_invariants_plugin.py runs the invariant
matrix with it in a subprocess to show that a newly registered method is covered with no edit to the tests. Nothing
else imports it: the registry has no unregister, so the method must stay out of every other process.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mmreduce.methods import DropStage, ReductionMethod, ScoreContext, register_method
from mmreduce.methods.base import check_layer, check_ratio

__all__ = ["NAME", "EveryOther"]

NAME = "throwaway_every_other"


@register_method(NAME)
@dataclass
class EveryOther(ReductionMethod):
    """Keep every other vision token (the 1st, 3rd, 5th, ...) from `layer` on; ranks by order, not attention.

    Parameters:
        layer: the first layer that sees only the kept tokens (>= 1).
        keep_ratio: kept fraction of the vision tokens; 0.5 keeps exactly the odd-numbered ones.
    """

    layer: int = 2
    keep_ratio: float = 0.5

    def __post_init__(self):
        check_layer("EveryOther", "layer", self.layer)
        check_ratio("EveryOther", "keep_ratio", self.keep_ratio)

    @classmethod
    def example(cls, num_layers: int, keep_all: bool = False) -> "EveryOther":
        if keep_all:
            return cls(layer=1, keep_ratio=1.0)
        return cls(layer=min(2, num_layers - 1), keep_ratio=0.5)

    def stages(self, num_layers: int) -> list[DropStage]:
        return [DropStage(score_layer=self.layer, apply_layer=self.layer, ratio=self.keep_ratio)]

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        # Numbering the surviving vision tokens of each row makes the choice independent of padding and batch.
        order = ctx.vision.long().cumsum(dim=1)  # (B, T): 1 at the first vision token, 2 at the second, ...
        return (order % 2 == 1).float()
