"""A before-the-LLM method followed by an in-LLM one, in one `wrap` (e.g. VisionZip, then PyramidDrop)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import DropStage, ReductionMethod, ScoreContext
from .before import BeforeLLMMethod

__all__ = ["Compose"]


@dataclass
class Compose(ReductionMethod):
    """`before` reduces the vision features before the language model; `inside` then drops inside it, treating
    the tokens that entered the LLM as the image's tokens (its fractions and counts are of those).

    `mmreduce.wrap(model, ["visionzip", "pdrop"])` builds one; the SPEC is `visionzip:... then pdrop:...`.
    """

    before: BeforeLLMMethod
    inside: ReductionMethod
    name = "compose"

    def __post_init__(self):
        if not isinstance(self.before, BeforeLLMMethod):
            raise ValueError(f"Compose takes [before-the-LLM method, in-LLM method] in that order; its first part "
                             f"must reduce before the LLM (pool, stride, visionzip, ...), got "
                             f"{type(self.before).__name__}")
        if not isinstance(self.inside, ReductionMethod) or isinstance(self.inside, (BeforeLLMMethod, Compose)):
            raise ValueError(f"Compose takes [before-the-LLM method, in-LLM method] in that order; its second part "
                             f"must work inside the LLM (fastv, pdrop, schedule, ...), got {type(self.inside).__name__}")

    @classmethod
    def example(cls, num_layers: int, keep_all: bool = False) -> "Compose":
        from .pdrop import PyramidDrop
        from .stride import Stride

        return cls(Stride.example(num_layers, keep_all), PyramidDrop.example(num_layers, keep_all))

    def before_stage(self) -> BeforeLLMMethod:
        return self.before

    def stages(self, num_layers: int) -> list[DropStage]:
        return self.inside.stages(num_layers)

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        return self.inside.score(ctx)

    def check_inputs(self, initial_vision: torch.Tensor) -> None:
        self.inside.check_inputs(initial_vision)

    def planned_counts(self, num_layers: int, initial: int) -> list[int]:
        return self.inside.planned_counts(num_layers, self.before.kept_tokens(initial))

    def describe(self) -> str:
        return f"{self.before.describe()} then {self.inside.describe()}"
