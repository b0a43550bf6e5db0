"""Pure tensor functions to recompute one query's attention row without eager attention."""

from __future__ import annotations

import torch

__all__ = ["apply_rotary", "last_query_attention", "rotate_half"]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(..., hd) -> (..., hd): [-x2, x1] for the halves x1, x2 (the rotate-half RoPE convention)."""
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE; `cos`/`sin` broadcast against `x` (..., hd)."""
    return x * cos + rotate_half(x) * sin


def last_query_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    scaling: float,
    key_valid: torch.Tensor,
    query_index: torch.Tensor,
) -> torch.Tensor:
    """Softmax attention of one query per sample over every key (GQA-aware).

    Args:
        query: (B, H, hd) post-RoPE query of each sample.
        key: (B, Hkv, T, hd) post-RoPE keys; H must be a multiple of Hkv.
        scaling: the attention scale (usually hd ** -0.5).
        key_valid: (B, T) bool; False keys get probability 0.
        query_index: (B,) the query's own position; keys after it are masked (causality).

    Returns:
        (B, H, T) float32 probabilities.
    """
    batch, heads, _ = query.shape
    kv_heads, seq = key.shape[1], key.shape[2]
    if heads % kv_heads:
        raise ValueError(f"query heads ({heads}) must be a multiple of key/value heads ({kv_heads})")
    grouped = query.float().view(batch, kv_heads, heads // kv_heads, -1)  # (B, Hkv, G, hd)
    logits = torch.einsum("bkgd,bktd->bkgt", grouped, key.float()) * scaling  # (B, Hkv, G, T)
    positions = torch.arange(seq, device=key.device)
    allowed = key_valid & (positions[None, :] <= query_index[:, None])  # (B, T)
    logits = logits.masked_fill(~allowed[:, None, None, :], float("-inf"))
    return logits.softmax(dim=-1).reshape(batch, heads, seq)  # (B, H, T)
