"""The interface every visual tokenizer offers (ARCHITECTURE.md §3): pixels -> ids -> embeddings."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from torch import Tensor

__all__ = ["VisualTokenizer"]


@runtime_checkable
class VisualTokenizer(Protocol):
    """A discrete image tokenizer.

    ``encode`` maps (B, 3, H, W) float pixels in [0, 1] to (B, N) int64 ids in [0, codebook_size);
    ``decode`` maps (B, N) ids back to (B, N, D) embeddings. An LLM front end adds an offset to the ids and
    wraps them in ``<img>`` ... ``</img>``.
    """

    codebook_size: int
    num_tokens: int

    def encode(self, pixels: Tensor) -> Tensor: ...

    def decode(self, ids: Tensor) -> Tensor: ...
