"""Raster patch tokens and the three TokenUnify corruptions.

Tokens: (B, *S) images or volumes -> (B, K, P) with K patches in raster order ((z,) y, x) and P voxels each.
Corruptions (TokenUnify's `cover_image_with_patches` and `preserve_patches_and_fill_rest`):
- random tokens: floor(ratio * K) tokens per sample replaced by 0 or N(0, 1) (ratio 0.4 in the paper);
- prefix: tokens at positions >= k replaced (k ~ U{1..K-1} per sample); the next-token target is token k and
  the next-all target is every token.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["patchify", "prefix_corrupt", "random_token_corrupt", "sample_prefix", "unpatchify"]

_FILLS = ("zero", "noise")


def _check(spatial: tuple[int, ...], patch: tuple[int, ...]) -> None:
    if len(spatial) != len(patch) or len(patch) not in (2, 3):
        raise ValueError(f"patch {patch} must have one size per spatial axis of {spatial} (2-D or 3-D)")
    bad = [(s, p) for s, p in zip(spatial, patch) if p < 1 or s % p]
    if bad:
        raise ValueError(f"spatial shape {spatial} is not divisible by patch {patch}")


def patchify(x: Tensor, patch: tuple[int, ...]) -> Tensor:
    """(B, *S) -> (B, K, P), K = prod(S_i / p_i) in raster order, P = prod(p_i) voxels in raster order."""
    spatial = tuple(x.shape[1:])
    _check(spatial, patch)
    nd = len(patch)
    grid = [s // p for s, p in zip(spatial, patch)]
    # (B, g0, p0, g1, p1[, g2, p2]) -> (B, g0, g1[, g2], p0, p1[, p2])
    shape = [x.shape[0]] + [v for g, p in zip(grid, patch) for v in (g, p)]
    perm = [0] + [1 + 2 * i for i in range(nd)] + [2 + 2 * i for i in range(nd)]
    return x.reshape(shape).permute(perm).reshape(x.shape[0], math.prod(grid), math.prod(patch))


def unpatchify(tokens: Tensor, spatial: tuple[int, ...], patch: tuple[int, ...]) -> Tensor:
    """Inverse of patchify: (B, K, P) -> (B, *S)."""
    _check(tuple(spatial), patch)
    nd = len(patch)
    grid = [s // p for s, p in zip(spatial, patch)]
    if tokens.shape[1:] != (math.prod(grid), math.prod(patch)):
        raise ValueError(f"tokens of shape {tuple(tokens.shape)} do not match spatial {spatial} / patch {patch}")
    b = tokens.shape[0]
    x = tokens.reshape([b, *grid, *patch])  # (B, g..., p...)
    perm = [0] + [v for i in range(nd) for v in (1 + i, 1 + nd + i)]  # -> (B, g0, p0, g1, p1, ...)
    return x.permute(perm).reshape(b, *spatial)


def _fill(like: Tensor, fill: str, generator: torch.Generator | None) -> Tensor:
    if fill not in _FILLS:
        raise ValueError(f"fill must be one of {_FILLS}, got {fill!r}")
    if fill == "zero":
        return torch.zeros_like(like)
    return torch.randn(like.shape, generator=generator, dtype=like.dtype)


def random_token_corrupt(tokens: Tensor, ratio: float = 0.4, fill: str = "zero",
                         generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Replace floor(ratio * K) random tokens per sample. (B, K, P) -> corrupted (B, K, P), mask (B, K) bool."""
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"ratio must be in (0, 1), got {ratio!r}")
    b, k, _ = tokens.shape
    n = math.floor(ratio * k)
    order = torch.rand(b, k, generator=generator).argsort(dim=1)  # a random permutation per sample
    mask = torch.zeros(b, k, dtype=torch.bool)
    mask.scatter_(1, order[:, :n], True)
    out = torch.where(mask[..., None], _fill(tokens, fill, generator), tokens)
    return out, mask


def sample_prefix(batch: int, num_tokens: int, generator: torch.Generator | None = None) -> Tensor:
    """k ~ U{1, ..., K-1} per sample: (B,) int64."""
    if num_tokens < 2:
        raise ValueError(f"need at least 2 tokens for a prefix, got {num_tokens}")
    return torch.randint(1, num_tokens, (batch,), generator=generator)


def prefix_corrupt(tokens: Tensor, k: Tensor, fill: str = "noise", generator: torch.Generator | None = None
                   ) -> tuple[Tensor, Tensor]:
    """Keep tokens at positions < k (per sample), replace the rest.

    Args:
        tokens: (B, K, P); k: (B,) int64 in [1, K-1].

    Returns:
        corrupted (B, K, P) and next-token target tokens[b, k_b] of shape (B, P).
    """
    b, num, _ = tokens.shape
    if k.shape != (b,) or int(k.min()) < 1 or int(k.max()) > num - 1:
        raise ValueError(f"k must be (B,)={b} values in [1, {num - 1}], got shape {tuple(k.shape)}, "
                         f"range [{int(k.min())}, {int(k.max())}]")
    keep = torch.arange(num)[None, :] < k[:, None]  # (B, K)
    out = torch.where(keep[..., None], tokens, _fill(tokens, fill, generator))
    return out, tokens[torch.arange(b), k]
