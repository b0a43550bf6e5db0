"""The unreduced model as a method: no drop stages, so every token reaches every layer, and stats are still kept."""

from __future__ import annotations

from dataclasses import dataclass

from .base import DropStage, ReductionMethod, register_method

__all__ = ["Baseline"]


@register_method("baseline")
@dataclass
class Baseline(ReductionMethod):
    """Keep every vision token (the reference row of every comparison; computes exactly what the stock model does)."""

    @classmethod
    def example(cls, num_layers: int, keep_all: bool = False) -> "Baseline":
        return cls()

    def stages(self, num_layers: int) -> list[DropStage]:
        return []
