"""The modality-adaptive Llama decoder of the stand-in (mPLUG-Owl2's "modality-adaptive module").

Every decoder layer has two branches of `input_layernorm`, `post_attention_layernorm`, `k_proj` and `v_proj`
(`MultiwayNetwork`, branch i under `.multiway[i]`): token t goes through branch `modality_indicators[t]` (0 text,
1 vision); `q_proj`, `o_proj` and the MLP are shared. The text model passes `modality_indicators` (B, T) to every
layer as a keyword argument, with RoPE `(cos, sin)` as `position_embeddings` and the mask from `create_causal_mask`.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import (
    LlamaMLP,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
    eager_attention_forward,
)
from transformers.utils.deprecation import deprecate_kwarg

from .configuration import DocOwlTextConfig
from .pretrained import DocOwlPreTrainedModel

__all__ = ["DocOwlAttention", "DocOwlDecoderLayer", "DocOwlTextModel", "MultiwayNetwork"]


class MultiwayNetwork(nn.Module):
    """`num_multiway` copies of a module; each token goes through the copy its indicator names."""

    def __init__(self, make: Callable[[], nn.Module], num_multiway: int = 2):
        super().__init__()
        self.multiway = nn.ModuleList(make() for _ in range(num_multiway))

    def forward(self, hidden_states: torch.Tensor, multiway_indices: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T, D_in), indicators (B, T) (None: all branch 0) -> (B, T, D_out)."""
        if multiway_indices is None:
            return self.multiway[0](hidden_states)
        multiway_indices = multiway_indices.expand(hidden_states.shape[:-1])
        present = [i for i in range(len(self.multiway)) if bool((multiway_indices == i).any())]
        if len(present) == 1:
            return self.multiway[present[0]](hidden_states)
        output = None
        for index in present:
            where = multiway_indices == index
            routed = self.multiway[index](hidden_states[where])  # (n, D_out)
            if output is None:
                output = routed.new_empty(*hidden_states.shape[:-1], routed.shape[-1])
            output[where] = routed
        return output


class DocOwlAttention(nn.Module):
    """Llama attention with modality-adaptive k/v projections, run through transformers' attention interface."""

    def __init__(self, config: DocOwlTextConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.is_causal = True
        width, kv_width = config.hidden_size, config.num_key_value_heads * self.head_dim
        bias = config.attention_bias
        self.q_proj = nn.Linear(width, config.num_attention_heads * self.head_dim, bias=bias)
        self.k_proj = MultiwayNetwork(lambda: nn.Linear(width, kv_width, bias=bias))
        self.v_proj = MultiwayNetwork(lambda: nn.Linear(width, kv_width, bias=bias))
        self.o_proj = nn.Linear(config.num_attention_heads * self.head_dim, width, bias=bias)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        modality_indicators: torch.Tensor | None = None,
        cache: Cache | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        shape = (*hidden_states.shape[:-1], -1, self.head_dim)
        query = self.q_proj(hidden_states).view(shape).transpose(1, 2)
        key = self.k_proj(hidden_states, modality_indicators).view(shape).transpose(1, 2)
        value = self.v_proj(hidden_states, modality_indicators).view(shape).transpose(1, 2)
        cos, sin = position_embeddings
        query, key = apply_rotary_pos_emb(query, key, cos, sin)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)
        interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation,
                                                                     eager_attention_forward)
        output, weights = interface(self, query, key, value, attention_mask, scaling=self.scaling,
                                    dropout=self.config.attention_dropout if self.training else 0.0)
        return self.o_proj(output.reshape(*hidden_states.shape[:-1], -1).contiguous()), weights


class DocOwlDecoderLayer(nn.Module):
    def __init__(self, config: DocOwlTextConfig, layer_idx: int):
        super().__init__()
        norm = lambda: LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)  # noqa: E731
        self.self_attn = DocOwlAttention(config, layer_idx)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = MultiwayNetwork(norm)
        self.post_attention_layernorm = MultiwayNetwork(norm)

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = False,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        modality_indicators: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states, modality_indicators)
        hidden_states, _ = self.self_attn(hidden_states, position_embeddings, attention_mask,
                                          modality_indicators=modality_indicators, cache=cache)
        hidden_states = residual + hidden_states
        residual = hidden_states
        hidden_states = self.mlp(self.post_attention_layernorm(hidden_states, modality_indicators))
        return residual + hidden_states


class DocOwlTextModel(DocOwlPreTrainedModel):
    """The decoder stack: `embed_tokens`, `layers`, `norm`, `rotary_emb` (the LLM of the stand-in)."""

    config_class = DocOwlTextConfig
    input_modalities = ("text",)

    def __init__(self, config: DocOwlTextConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(DocOwlDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        modality_indicators: torch.Tensor | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        """`modality_indicators` (B, T): 1 on vision features, 0 on text (None: all text)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if position_ids is None:
            past = cache.get_seq_length() if cache is not None else 0
            position_ids = (torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past)[None]
        if modality_indicators is None:
            modality_indicators = torch.zeros(inputs_embeds.shape[:2], dtype=torch.long, device=inputs_embeds.device)
        mask = create_causal_mask(config=self.config, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                  cache=cache, position_ids=position_ids)
        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids=position_ids)
        for layer in self.layers:
            hidden_states = layer(
                hidden_states,
                attention_mask=mask,
                position_ids=position_ids,
                cache=cache,
                use_cache=use_cache,
                position_embeddings=position_embeddings,
                modality_indicators=modality_indicators,
            )
        return BaseModelOutputWithPast(last_hidden_state=self.norm(hidden_states), cache=cache if use_cache else None)
