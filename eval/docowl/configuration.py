"""Configurations of the mPLUG-DocOwl 1.5 stand-in: ViT, H-Reducer, modality-adaptive Llama, and the whole model.

The defaults are DocOwl 1.5's published sizes (ViT-L/14 at 448 px, a 1x4 H-Reducer, a LLaMA-2-7B-sized decoder).
Unlike the original (a flat Llama config with a `visual_config` dict), the three parts are sub-configs, as
transformers 5 composite models are written; `DocOwlConfig.tokens_per_crop` is what one crop becomes in the LLM.
"""

from __future__ import annotations

from transformers import LlamaConfig, PreTrainedConfig

__all__ = ["DocOwlConfig", "DocOwlHReducerConfig", "DocOwlTextConfig", "DocOwlVisionConfig", "IMAGE_TOKEN_INDEX"]

#: The `<|image|>` placeholder id: outside the vocabulary (never embedded, never generated), one per crop.
IMAGE_TOKEN_INDEX = -200


class DocOwlVisionConfig(PreTrainedConfig):
    """The ViT (`MplugOwlVisionModel`): CLS token + conv patches, learned positions, pre-LN, fused q/k/v."""

    model_type = "mplug_owl_vision_model"
    base_config_key = "vision_config"

    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    num_channels: int = 3
    image_size: int = 448
    patch_size: int = 14
    layer_norm_eps: float = 1e-6
    attention_dropout: float = 0.0
    initializer_range: float = 0.02


class DocOwlHReducerConfig(PreTrainedConfig):
    """The H-Reducer: `conv_shape` "1x4" merges 4 horizontally adjacent patches into one token."""

    model_type = "mplug_docowl_hreducer"
    base_config_key = "hreducer_config"

    hidden_size: int = 1024  # the ViT's width
    conv_shape: str = "1x4"
    layer_norm_eps: float = 1e-6
    initializer_range: float = 0.02

    @property
    def kernel(self) -> tuple[int, int]:
        rows, cols = (int(x) for x in self.conv_shape.split("x"))
        return rows, cols

    def token_grid(self, side: int) -> tuple[int, int]:
        """(rows, cols) of the tokens made from a side x side patch map: both convs stride by the kernel, and the
        channel groups in between are laid along the width (side x side/4 for 1x4)."""
        kernel_rows, kernel_cols = self.kernel
        return side // kernel_rows // kernel_rows, (side // kernel_cols) * kernel_rows * kernel_cols // kernel_cols


class DocOwlTextConfig(LlamaConfig):
    """The modality-adaptive Llama decoder (LLaMA-2-7B sizes by default)."""

    model_type = "mplug_docowl_text"
    base_config_key = "text_config"

    max_position_embeddings: int = 4096


class DocOwlConfig(PreTrainedConfig):
    """The whole model: `image_token_id` marks one crop (`<|image|>`), expanded into `tokens_per_crop` features."""

    model_type = "mplug_docowl"
    sub_configs_defaults = {
        "vision_config": DocOwlVisionConfig,
        "hreducer_config": DocOwlHReducerConfig,
        "text_config": DocOwlTextConfig,
    }

    vision_config: dict | PreTrainedConfig | None = None
    hreducer_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    image_token_id: int = IMAGE_TOKEN_INDEX
    tie_word_embeddings: bool = False

    @property
    def tokens_per_crop(self) -> int:
        """LLM tokens of one crop: the H-Reducer's token grid plus `vit_eos`, (32 x 8) + 1 = 257 at 448 px with 1x4."""
        rows, cols = self.hreducer_config.token_grid(self.vision_config.image_size // self.vision_config.patch_size)
        return rows * cols + 1
