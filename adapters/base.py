"""What mmreduce needs to know about a model family, and nothing else.

The engine (`mmreduce.engine`) never asks "is this LLaVA?": it asks an adapter where the vision tokens are, which
modules are the decoder layers, and how to recompute one layer's attention row without eager attention.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from mmreduce.probe import apply_rotary, last_query_attention

__all__ = ["NEWLINE", "ImageGrid", "ModelAdapter", "TokenCell"]

#: `TokenCell.panel` of a newline token (LLaVA-NeXT ends every feature row with one).
NEWLINE = -1


@dataclass(frozen=True)
class TokenCell:
    """Where one vision token of a prompt comes from: patch (row, col) of panel `panel` of image `image`.

    Panels: 0 is the whole image (LLaVA-1.5's image, LLaVA-NeXT's base image, a global image or thumbnail),
    k >= 1 is crop or tile k (row-major); a newline token has panel NEWLINE and `row` = the feature row it ends.
    """

    image: int
    panel: int
    row: int
    col: int


@dataclass(frozen=True)
class ImageGrid:
    """The panels of one image: `crops` (rows, cols) of crops or tiles, (0, 0) for a single panel, and `side`
    patches per panel side."""

    crops: tuple[int, int]
    side: int


class ModelAdapter:
    """Base class for model-family adapters (one subclass per family, keyed by `config.model_type`).

    Subclasses set `model_types` and implement the four properties at the top; the Llama-style defaults below
    (attention probe, per-token kwargs) fit every decoder whose layers have `input_layernorm` and a `self_attn`
    with `q_proj`/`k_proj`, `head_dim` and rotate-half RoPE (Llama, Vicuna, Mistral, Qwen2, Qwen3).
    """

    model_types: ClassVar[tuple[str, ...]] = ()
    #: Decoder-layer keyword arguments holding one entry per token along dim 1, (B, T, ...), that the engine must
    #: gather with the hidden states at every drop (e.g. DocOwl's `modality_indicators`).
    per_token_layer_kwargs: ClassVar[tuple[str, ...]] = ()

    def __init__(self, model: nn.Module):
        self.model = model

    @classmethod
    def model_class(cls, config) -> type[nn.Module]:
        """The transformers class that loads a checkpoint of this family with `from_pretrained`."""
        from transformers import AutoModelForImageTextToText

        try:
            return AutoModelForImageTextToText._model_mapping[type(config)]
        except KeyError:
            raise ValueError(f"{cls.__name__} has no model class for {type(config).__name__}; override "
                             "ModelAdapter.model_class") from None

    # ---- family specifics -------------------------------------------------------------------------------------
    @property
    def multimodal_model(self) -> nn.Module:
        """The module that receives `input_ids` and merges vision features (its pre-hook finds the vision tokens)."""
        raise NotImplementedError

    @property
    def text_model(self) -> nn.Module:
        """The decoder stack (`forward(inputs_embeds=..., attention_mask=..., cache=...)`)."""
        raise NotImplementedError

    @property
    def vision_tower(self) -> nn.Module | None:
        """The vision encoder (timed separately in the stats); None when the family has none."""
        return None

    def vision_token_ids(self) -> tuple[int, ...]:
        """Token ids whose positions hold vision features after the merge."""
        raise NotImplementedError

    # ---- derived ----------------------------------------------------------------------------------------------
    @property
    def text_config(self):
        return self.text_model.config

    def decoder_layers(self) -> nn.ModuleList:
        return self.text_model.layers

    @property
    def num_layers(self) -> int:
        """Decoder layers of the language model."""
        return len(self.decoder_layers())

    def count_vision_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B,) vision tokens of each prompt in `input_ids` (B, T)."""
        return self.vision_mask(input_ids=input_ids).sum(dim=1)

    def text_vision_mask(self, text_kwargs: dict[str, Any]) -> torch.Tensor | None:
        """(B, T) vision mask read from the text model's own arguments, for families that expand their image
        placeholders before the text model (the multimodal module's `input_ids` then do not line up with the
        text model's tokens); None (the default) takes the mask from `vision_mask` on the multimodal inputs."""
        return None

    def token_layout(self, inputs: dict) -> tuple[list[TokenCell], list[ImageGrid]]:
        """Every vision token of a one-prompt `inputs` (processor outputs) in `input_ids` order, and each image's
        panel grid: what methods, stats and the demo's overlays use to map tokens to pixels."""
        raise NotImplementedError(f"{type(self).__name__} has no token layout for "
                                  f"{getattr(self.model.config, 'model_type', '?')}")

    def logits_from_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., D) output of the last decoder layer -> (..., V) logits (final norm, then the LM head)."""
        return self.model.get_output_embeddings()(self.text_model.norm(hidden))

    def vision_mask(
        self, input_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        """(B, T) bool, True where a vision feature sits; None when it cannot be known (no ids, no embeddings).

        Without `input_ids`, a position is a vision position when its embedding equals the embedding of a vision
        token id (what the stock merge check does); merged features replace those embeddings only later.
        """
        ids = self.vision_token_ids()
        if input_ids is not None:
            mask = torch.zeros_like(input_ids, dtype=torch.bool)
            for token_id in ids:
                mask |= input_ids == token_id
            return mask
        if inputs_embeds is not None:
            table = self.text_model.get_input_embeddings()
            mask = torch.zeros(inputs_embeds.shape[:2], dtype=torch.bool, device=inputs_embeds.device)
            for token_id in ids:
                token = table(torch.tensor(token_id, device=inputs_embeds.device)).to(inputs_embeds.dtype)
                mask |= (inputs_embeds == token).all(-1)
            return mask
        return None

    def attention_probe(
        self,
        layer: nn.Module,
        hidden: torch.Tensor,
        query_index: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        key_valid: torch.Tensor,
        layer_kwargs: dict[str, Any] | None = None,
    ) -> torch.Tensor:
        """Attention probabilities of one query per sample over all keys, as `layer` would compute them.

        Recomputed from the layer's own input norm, q/k projections (and q/k norms if present) and RoPE, so it
        works whatever attention implementation runs the layer (sdpa, eager, flash).

        Args:
            layer: a decoder layer.
            hidden: (B, T, D) the layer's input hidden states.
            query_index: (B,) position in `hidden` of the query token of each sample.
            position_embeddings: (cos, sin), each (B or 1, T, head_dim), for the tokens of `hidden`.
            key_valid: (B, T) bool, keys that may be attended to (padding and dropped tokens are False).
            layer_kwargs: the other keyword arguments the layer receives for this stream (with the
                `per_token_layer_kwargs` gathered to it), for families whose projections depend on them.

        Returns:
            (B, H, T) float32 probabilities; keys after the query or invalid get 0.
        """
        attn = layer.self_attn
        head_dim = attn.head_dim
        batch, seq, _ = hidden.shape
        rows = torch.arange(batch, device=hidden.device)
        normed = layer.input_layernorm(hidden)  # (B, T, D)
        query = attn.q_proj(normed[rows, query_index]).view(batch, -1, head_dim)  # (B, H, hd)
        key = attn.k_proj(normed).view(batch, seq, -1, head_dim)  # (B, T, Hkv, hd)
        if getattr(attn, "q_norm", None) is not None:  # Qwen3-style per-head norms
            query, key = attn.q_norm(query), attn.k_norm(key)
        cos, sin = (t.expand(batch, -1, -1) for t in position_embeddings)  # (B, T, hd)
        query = apply_rotary(query, cos[rows, query_index].unsqueeze(1), sin[rows, query_index].unsqueeze(1))
        key = apply_rotary(key.transpose(1, 2), cos.unsqueeze(1), sin.unsqueeze(1))  # (B, Hkv, T, hd)
        return last_query_attention(query, key, attn.scaling, key_valid, query_index)

    def gather_layer_kwargs(self, kwargs: dict, original_index: torch.Tensor) -> dict:
        """Per-token layer kwargs for a shortened stream.

        Args:
            kwargs: the decoder layer's kwargs at full prompt length (`position_embeddings` (cos, sin) each
                (B or 1, T, hd), `position_ids` (B or 1, T)).
            original_index: (B, T') indices into the full prompt of the tokens kept in the stream.

        Returns:
            The entries to replace: RoPE of the kept tokens at their *original* positions (gaps stay gaps), and
            every `per_token_layer_kwargs` entry gathered at the kept tokens.
        """
        out = {}
        batch = original_index.shape[0]
        for name in self.per_token_layer_kwargs:
            if kwargs.get(name) is not None:
                value = kwargs[name]
                out[name] = _gather_tokens(value.expand(batch, *value.shape[1:]), original_index)
        if kwargs.get("position_embeddings") is not None:
            out["position_embeddings"] = tuple(
                _gather_tokens(t.expand(batch, *t.shape[1:]), original_index) for t in kwargs["position_embeddings"]
            )
        position_ids = kwargs.get("position_ids")
        if position_ids is not None:
            if position_ids.dim() != 2:
                raise ValueError(
                    f"{type(self).__name__} expects 2-D position_ids (B, T), got shape {tuple(position_ids.shape)}; "
                    "a family with multi-axis positions needs its own adapter.gather_layer_kwargs"
                )
            out["position_ids"] = position_ids.expand(batch, -1).gather(1, original_index)
        return out


def _gather_tokens(tensor: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """tensor (B, T, ...) gathered along T with index (B, T') -> (B, T', ...)."""
    expanded = index.view(*index.shape, *([1] * (tensor.dim() - 2))).expand(*index.shape, *tensor.shape[2:])
    return tensor.gather(1, expanded)
