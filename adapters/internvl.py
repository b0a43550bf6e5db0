"""InternVL (`InternVLForConditionalGeneration`: InternVL2.5 / InternVL3 "-hf" checkpoints).

A prompt holds each image as `<img>` + `<IMG_CONTEXT>` x (tokens per tile x tiles) + `</img>`. The tiles are the
image's crops in row-major order followed by a thumbnail of the whole image (no thumbnail when the image is a
single tile); each tile gives (image_size / patch_size)^2 x downsample_ratio^2 tokens after the pixel shuffle and
the projector (256 for 448 px tiles, patch 14, ratio 0.5). The merge writes the features into the positions of
`config.image_token_id` (`<IMG_CONTEXT>`) only, so those are the vision tokens; `<img>` and `</img>` stay text and
are never dropped. Video frames use the same context token, so they are covered too.

The language model is Qwen2 (Llama-style layers with GQA and q/k/v biases, rotate-half RoPE, 2-D position ids):
the default probe and kwargs gathering of `ModelAdapter` fit it as they are. Module paths are LLaVA's
(`.model.language_model`, `.model.vision_tower`). The remote-code checkpoints (`model_type` "internvl_chat",
`InternVLChatModel`) have another layout and are refused: use the "-hf" conversions.
"""

from __future__ import annotations

from torch import nn

from .base import ModelAdapter

__all__ = ["InternVLAdapter"]


class InternVLAdapter(ModelAdapter):
    model_types = ("internvl",)

    def __init__(self, model: nn.Module):
        super().__init__(model)
        config = getattr(model, "config", None)
        model_type = getattr(config, "model_type", None)
        if model_type not in self.model_types:
            hint = (" (the remote-code InternVLChatModel: load the \"-hf\" checkpoint with "
                    "InternVLForConditionalGeneration instead)" if model_type == "internvl_chat" else "")
            raise TypeError(
                f"InternVLAdapter serves model_type {' / '.join(self.model_types)}, got {model_type!r} "
                f"({type(model).__name__}){hint}; pass the adapter of that family (or none, to pick it from the "
                "config)"
            )
        # The whole model, or its inner InternVLModel (no LM head).
        inner = model if hasattr(model, "language_model") else getattr(model, "model", None)
        missing = [name for name in ("vision_tower", "language_model") if not hasattr(inner, name)]
        if inner is None or missing or not hasattr(inner.language_model, "layers"):
            raise TypeError(
                f"{type(model).__name__} has no `.model.vision_tower` and `.model.language_model.layers`; "
                "InternVLAdapter expects InternVLForConditionalGeneration (or its inner InternVLModel)"
            )
        if getattr(config, "image_token_id", None) is None:
            raise TypeError("internvl config has no image_token_id; cannot locate the vision tokens")
        self._inner = inner

    @property
    def multimodal_model(self) -> nn.Module:
        return self._inner

    @property
    def text_model(self) -> nn.Module:
        return self._inner.language_model

    @property
    def vision_tower(self) -> nn.Module | None:
        return self._inner.vision_tower

    def vision_token_ids(self) -> tuple[int, ...]:
        """The `<IMG_CONTEXT>` id only: `<img>` / `</img>` are text."""
        return (int(self.model.config.image_token_id),)
