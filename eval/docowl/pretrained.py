"""The base class of every stand-in module that is a `PreTrainedModel`: attention flags and weight init."""

from __future__ import annotations

from torch import nn
from transformers import PreTrainedModel
from transformers.initialization import normal_

from .configuration import DocOwlConfig

__all__ = ["DocOwlPreTrainedModel"]


class DocOwlPreTrainedModel(PreTrainedModel):
    config_class = DocOwlConfig
    base_model_prefix = "model"
    input_modalities = ("image", "text")
    _no_split_modules = ["DocOwlDecoderLayer", "MplugOwlVisionEncoderLayer"]
    # Eager and sdpa are what the tests run; the attention interface would dispatch others, untested here.
    _supports_sdpa = True
    _supports_attention_backend = True

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        std = getattr(self.config.get_text_config(), "initializer_range", 0.02)
        for name in ("cls_token", "position_embedding", "vit_eos"):  # explicit parameters of the ViT and H-Reducer
            if isinstance(getattr(module, name, None), nn.Parameter):
                normal_(getattr(module, name), mean=0.0, std=std)
