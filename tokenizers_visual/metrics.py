"""Metric functions shared by the tokenizers: retrieval recall with duplicate-aware matching."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["recall_at_k"]


def recall_at_k(sim: Tensor, query_keys: Sequence[str], gallery_keys: Sequence[str], ks: Sequence[int] = (1, 5)
                ) -> dict[int, float]:
    """Share of queries whose top-k gallery items contain a correct match.

    Generated captions repeat, so "correct" means the gallery item's key (its caption) equals the query's key,
    not only the item with the same index.

    Args:
        sim: (Q, G) similarity, higher is better.
        query_keys: Q keys; gallery_keys: G keys.
        ks: cut-offs.

    Returns:
        {k: recall in [0, 1]}.
    """
    if sim.dim() != 2 or sim.shape != (len(query_keys), len(gallery_keys)):
        raise ValueError(f"sim must be ({len(query_keys)}, {len(gallery_keys)}), got {tuple(sim.shape)}")
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be positive cut-offs, got {ks!r}")
    index = {key: i for i, key in enumerate(sorted(set(query_keys) | set(gallery_keys)))}
    q = torch.tensor([index[k] for k in query_keys])
    g = torch.tensor([index[k] for k in gallery_keys])
    match = q[:, None] == g[None, :]  # (Q, G) bool
    order = sim.argsort(dim=1, descending=True, stable=True)  # ties go to the lower gallery index
    hits = torch.gather(match, 1, order)  # (Q, G): match flags in ranked order
    return {k: hits[:, :k].any(dim=1).float().mean().item() for k in ks}
