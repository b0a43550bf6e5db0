"""Causal Q-Former: N learned queries, causal self-attention among them, cross-attention to frozen ViT tokens.

Query i attends to queries 0..i only (SEED switches BERT's bidirectional query attention to a lower-triangular
mask), so the i-th output summarises the image conditioned on the earlier ones; an LLM reading the ids left to
right then sees a causally consistent sequence. Stage 1 trains it with ITC on the **last** query.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .config import QFormerConfig

__all__ = ["CausalQFormer", "QFormerLayer", "causal_mask"]


def causal_mask(n: int, device: torch.device | None = None) -> Tensor:
    """(n, n) bool mask for nn.MultiheadAttention: True above the diagonal = query i may not see j > i."""
    return torch.ones(n, n, dtype=torch.bool, device=device).triu(1)


class QFormerLayer(nn.Module):
    """Pre-norm block: causal self-attention over queries, cross-attention to image tokens, MLP."""

    def __init__(self, width: int, heads: int, kv_dim: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.self_attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(width)
        self.cross_attn = nn.MultiheadAttention(width, heads, kdim=kv_dim, vdim=kv_dim, batch_first=True)
        self.norm3 = nn.LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def forward(self, q: Tensor, kv: Tensor, mask: Tensor) -> Tensor:
        """q: (B, N, width); kv: (B, T, kv_dim); mask: (N, N) bool. Returns (B, N, width)."""
        h = self.norm1(q)
        q = q + self.self_attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        h = self.norm2(q)
        q = q + self.cross_attn(h, kv, kv, need_weights=False)[0]
        return q + self.mlp(self.norm3(q))


class CausalQFormer(nn.Module):
    """(B, T, kv_dim) image tokens -> (B, N, width) causal query embeddings."""

    def __init__(self, config: QFormerConfig, kv_dim: int) -> None:
        super().__init__()
        self.config = c = config
        self.queries = nn.Parameter(torch.randn(c.num_queries, c.width) * 0.02)
        self.kv_norm = nn.LayerNorm(kv_dim)  # BLIP-2's ln_vision on the frozen tower's output
        self.layers = nn.ModuleList(QFormerLayer(c.width, c.heads, kv_dim, c.mlp_ratio) for _ in range(c.depth))
        self.norm = nn.LayerNorm(c.width)
        self.register_buffer("mask", causal_mask(c.num_queries), persistent=False)

    def forward(self, image_tokens: Tensor) -> Tensor:
        if image_tokens.dim() != 3:
            raise ValueError(f"image_tokens must be (B, T, D), got shape {tuple(image_tokens.shape)}")
        kv = self.kv_norm(image_tokens)
        q = self.queries.unsqueeze(0).expand(image_tokens.shape[0], -1, -1)  # (N, W) -> (B, N, W)
        for layer in self.layers:
            q = layer(q, kv, self.mask)
        return self.norm(q)
