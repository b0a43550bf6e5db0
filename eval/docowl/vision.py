"""The ViT of the stand-in (`MplugOwlVisionModel`): CLS + conv patches, learned positions, pre-LN, fused q/k/v.

Module names follow DocOwl 1.5's vision encoder (`embeddings.{cls_token, patch_embed, position_embedding,
pre_layernorm}`, `encoder.layers.i.{input_layernorm, self_attn.{query_key_value, dense}, post_attention_layernorm,
mlp.{fc1, fc2}}`, `post_layernorm`). The fused projection is read per head: (B, S, H, 3, hd), so q, k and v of one
head are adjacent. Output: (N, 1 + (S/p)^2, D), (N, 1025, 1024) at 448 px.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutput
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import eager_attention_forward

from .configuration import DocOwlVisionConfig
from .pretrained import DocOwlPreTrainedModel

__all__ = ["MplugOwlVisionModel"]


class MplugOwlVisionEmbeddings(nn.Module):
    def __init__(self, config: DocOwlVisionConfig):
        super().__init__()
        width = config.hidden_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.patch_embed = nn.Conv2d(config.num_channels, width, config.patch_size, config.patch_size, bias=False)
        num_patches = (config.image_size // config.patch_size) ** 2
        self.position_embedding = nn.Parameter(torch.zeros(1, num_patches + 1, width))
        self.pre_layernorm = nn.LayerNorm(width, eps=config.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embed(pixel_values).flatten(2).transpose(1, 2)  # (N, P, D)
        cls = self.cls_token.expand(patches.shape[0], -1, -1).to(patches.dtype)
        tokens = torch.cat([cls, patches], dim=1)
        return self.pre_layernorm(tokens + self.position_embedding[:, : tokens.shape[1]].to(tokens.dtype))


class MplugOwlVisionAttention(nn.Module):
    """Bidirectional multi-head attention through transformers' attention interface (eager, sdpa, ...)."""

    def __init__(self, config: DocOwlVisionConfig):
        super().__init__()
        self.config = config
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // self.num_heads
        self.scaling = self.head_dim**-0.5
        self.num_key_value_groups = 1
        self.is_causal = False
        self.query_key_value = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch, seq, _ = hidden_states.shape
        fused = self.query_key_value(hidden_states).view(batch, seq, self.num_heads, 3, self.head_dim)
        query, key, value = fused.permute(3, 0, 2, 1, 4)  # each (B, H, S, hd)
        interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation,
                                                                     eager_attention_forward)
        output, weights = interface(self, query, key, value, None, scaling=self.scaling,
                                    dropout=self.config.attention_dropout if self.training else 0.0)
        return self.dense(output.reshape(batch, seq, -1)), weights


class MplugOwlMLP(nn.Module):
    def __init__(self, config: DocOwlVisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc1(x)
        return self.fc2(x * torch.sigmoid(1.702 * x))  # QuickGELU


class MplugOwlVisionEncoderLayer(nn.Module):
    def __init__(self, config: DocOwlVisionConfig):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = MplugOwlVisionAttention(config)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = MplugOwlMLP(config)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = hidden_states + self.self_attn(self.input_layernorm(hidden_states))[0]
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class MplugOwlVisionEncoder(nn.Module):
    def __init__(self, config: DocOwlVisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(MplugOwlVisionEncoderLayer(config) for _ in range(config.num_hidden_layers))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            hidden_states = layer(hidden_states)
        return hidden_states


class MplugOwlVisionModel(DocOwlPreTrainedModel):
    config_class = DocOwlVisionConfig
    main_input_name = "pixel_values"
    input_modalities = ("image",)

    def __init__(self, config: DocOwlVisionConfig):
        super().__init__(config)
        self.embeddings = MplugOwlVisionEmbeddings(config)
        self.encoder = MplugOwlVisionEncoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_init()

    def forward(self, pixel_values: torch.Tensor) -> BaseModelOutput:
        """(N, 3, S, S) crops -> last_hidden_state (N, 1 + (S/p)^2, D), CLS first."""
        hidden = self.encoder(self.embeddings(pixel_values.to(self.embeddings.patch_embed.weight.dtype)))
        return BaseModelOutput(last_hidden_state=self.post_layernorm(hidden))
