"""Prefill FLOPs per decoder layer from token counts and the text config.

Three conventions:
  - "exact": a direct count, 2 FLOPs per multiply-add, GQA-aware (k/v projections are Hkv·hd wide), attention
    scores and the weighted sum over the full n×n square, SwiGLU MLP (3 matrices).
  - "fastv": FastV's per-layer 4nd² + 2n²d + 2ndm (multiply-adds of a square-attention, 2-matrix-MLP layer).
  - "pdrop": PyramidDrop's correction 4nd² + 2n²d + 3ndm (SwiGLU has three matrices).
The papers count multiply-adds, so "exact" is about twice their figures; ratios (speedups) are comparable.
The papers' tables also count only the vision tokens (n = 576 for LLaVA-1.5), which `paper_tflops` reproduces.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

__all__ = ["CONVENTIONS", "ModelDims", "decode_flops_per_token", "layer_flops", "paper_tflops", "prefill_flops"]

CONVENTIONS = ("exact", "fastv", "pdrop")


@dataclass(frozen=True)
class ModelDims:
    hidden: int
    intermediate: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    num_layers: int

    @classmethod
    def from_config(cls, config) -> "ModelDims":
        heads = config.num_attention_heads
        return cls(
            hidden=config.hidden_size,
            intermediate=config.intermediate_size,
            num_heads=heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
            num_layers=config.num_hidden_layers,
        )


def layer_flops(n: float, dims: ModelDims, convention: str = "exact") -> float:
    """FLOPs of one decoder layer over n tokens at prefill."""
    d, m = dims.hidden, dims.intermediate
    if convention == "fastv":
        return 4 * n * d * d + 2 * n * n * d + 2 * n * d * m
    if convention == "pdrop":
        return 4 * n * d * d + 2 * n * n * d + 3 * n * d * m
    if convention != "exact":
        raise ValueError(f"unknown FLOPs convention {convention!r}; choose one of {CONVENTIONS}")
    q_width, kv_width = dims.num_heads * dims.head_dim, dims.num_kv_heads * dims.head_dim
    projections = 2 * n * d * q_width + 2 * 2 * n * d * kv_width + 2 * n * q_width * d  # q, k+v, o
    attention = 2 * 2 * n * n * q_width  # scores and weighted sum, every head
    mlp = 2 * 3 * n * d * m
    return projections + attention + mlp


def prefill_flops(tokens_per_layer: Sequence[float], dims: ModelDims, convention: str = "exact") -> float:
    """Sum of `layer_flops` over layers; `tokens_per_layer[l]` tokens enter layer l."""
    if len(tokens_per_layer) != dims.num_layers:
        raise ValueError(f"tokens_per_layer has {len(tokens_per_layer)} entries for {dims.num_layers} layers")
    return float(sum(layer_flops(n, dims, convention) for n in tokens_per_layer))


def decode_flops_per_token(cache_lengths: Sequence[float], dims: ModelDims) -> float:
    """"exact" FLOPs of one decode step; `cache_lengths[l]` keys/values are attended to at layer l.
    Only the attention term depends on the cache, which is why decode gains are small (FastV issue #22)."""
    q_width, kv_width = dims.num_heads * dims.head_dim, dims.num_kv_heads * dims.head_dim
    fixed = 2 * dims.hidden * (2 * q_width + 2 * kv_width) + 2 * 3 * dims.hidden * dims.intermediate
    return float(sum(fixed + 2 * 2 * length * q_width for length in cache_lengths))


def paper_tflops(vision_tokens: float, dims: ModelDims, convention: str = "pdrop") -> float:
    """The papers' headline figure: n = vision tokens in every layer (text ignored), in TFLOPs."""
    return prefill_flops([vision_tokens] * dims.num_layers, dims, convention) / 1e12
