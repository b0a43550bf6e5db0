"""LLaVA-1.5 (`LlavaForConditionalGeneration`) and LLaVA-NeXT (`LlavaNextForConditionalGeneration`).

Both merge projected vision features into the positions of `config.image_token_id`; LLaVA-NeXT's anyres crops and
its `image_newline` rows use the same placeholder id, so one vision mask covers base image, crops and newlines.
"""

from __future__ import annotations

from torch import nn

from .base import ModelAdapter

__all__ = ["LlavaAdapter"]


class LlavaAdapter(ModelAdapter):
    model_types = ("llava", "llava_next")

    def __init__(self, model: nn.Module):
        super().__init__(model)
        inner = getattr(model, "model", None)
        if inner is None or not hasattr(inner, "language_model"):
            raise TypeError(
                f"{type(model).__name__} has no `.model.language_model`; LlavaAdapter expects "
                "LlavaForConditionalGeneration / LlavaNextForConditionalGeneration (or their `.model`)"
            )

    @property
    def multimodal_model(self) -> nn.Module:
        return self.model.model

    @property
    def text_model(self) -> nn.Module:
        return self.model.model.language_model

    @property
    def vision_tower(self) -> nn.Module | None:
        return getattr(self.model.model, "vision_tower", None)

    def vision_token_ids(self) -> tuple[int, ...]:
        config = self.model.config
        token_id = getattr(config, "image_token_id", None)
        if token_id is None:
            token_id = getattr(config, "image_token_index", None)
        if token_id is None:
            raise ValueError(f"{config.model_type} config has no image_token_id; cannot locate the vision tokens")
        return (int(token_id),)
