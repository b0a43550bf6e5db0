"""Vector quantizer: SEED's original settings and the improved variants, with usage statistics.

SEED (`SEED_Tokenizer/lavis/models/quantize_semantic.py`, from taming-transformers) quantises with plain squared
L2 distance to a codebook initialised uniform(-1/K, 1/K), gradient-trained, no EMA, no restarts, and weights the
two VQ terms "legacy" style: ``||sg[z_q] - z||^2 + beta * ||z_q - sg[z]||^2`` with beta = 0.25 (the codebook term,
not the commitment term, carries beta). The improved variants are the usual fixes for codebook collapse:
cosine codes (l2-normalised), EMA codebook updates, k-means initialisation on the first batch and dead-code
restart from batch vectors. Codebook usage and perplexity are returned by every forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["VQConfig", "VQOutput", "VectorQuantizer", "codebook_stats", "kmeans"]

_DISTANCES = ("l2", "cosine")


@dataclass
class VQConfig:
    """Quantizer settings. The defaults are SEED's original quantizer (``VQConfig.original()``).

    Attributes:
        codebook_size: number of codes K.
        dim: code dimension D.
        beta: weight of the second VQ term (see ``legacy``).
        legacy: SEED/taming weighting ``||sg[zq]-z||^2 + beta*||zq-sg[z]||^2``; False gives VQ-VAE's
            ``beta*||sg[zq]-z||^2 + ||zq-sg[z]||^2``.
        distance: "l2" (squared Euclidean) or "cosine" (codes and inputs l2-normalised).
        ema_decay: if set, the codebook is an EMA of assigned vectors (no codebook gradient, no codebook loss term).
        kmeans_init: initialise the codebook by k-means on the first training batch.
        kmeans_iters: Lloyd iterations for the k-means initialisation.
        dead_code_threshold: restart a code from a random batch vector when its EMA count of assignments per
            batch falls below this (0 disables).
        usage_decay: decay of the EMA assignment counts used by dead-code restart.
    """

    codebook_size: int = 512
    dim: int = 32
    beta: float = 0.25
    legacy: bool = True
    distance: str = "l2"
    ema_decay: float | None = None
    kmeans_init: bool = False
    kmeans_iters: int = 10
    dead_code_threshold: float = 0.0
    usage_decay: float = 0.99

    def __post_init__(self) -> None:
        if not isinstance(self.codebook_size, int) or self.codebook_size < 2:
            raise ValueError(f"codebook_size must be an int >= 2, got {self.codebook_size!r}")
        if not isinstance(self.dim, int) or self.dim < 1:
            raise ValueError(f"dim must be a positive int, got {self.dim!r}")
        if not self.beta >= 0:
            raise ValueError(f"beta must be >= 0, got {self.beta!r}")
        if self.distance not in _DISTANCES:
            raise ValueError(f"distance must be one of {_DISTANCES}, got {self.distance!r}")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1) or None, got {self.ema_decay!r}")
        if not isinstance(self.kmeans_iters, int) or self.kmeans_iters < 1:
            raise ValueError(f"kmeans_iters must be a positive int, got {self.kmeans_iters!r}")
        if not self.dead_code_threshold >= 0:
            raise ValueError(f"dead_code_threshold must be >= 0, got {self.dead_code_threshold!r}")
        if not 0.0 < self.usage_decay < 1.0:
            raise ValueError(f"usage_decay must be in (0, 1), got {self.usage_decay!r}")

    @classmethod
    def original(cls, codebook_size: int = 512, dim: int = 32) -> "VQConfig":
        """SEED's quantizer: squared L2, uniform init, gradient codebook, beta = 0.25 legacy weighting."""
        return cls(codebook_size=codebook_size, dim=dim)

    @classmethod
    def improved(cls, codebook_size: int = 512, dim: int = 32) -> "VQConfig":
        """Cosine codes + EMA + k-means init + dead-code restart (VQ-VAE weighting, beta = 0.25 commitment)."""
        return cls(codebook_size=codebook_size, dim=dim, legacy=False, distance="cosine", ema_decay=0.95,
                   kmeans_init=True, dead_code_threshold=0.5)


class VQOutput(NamedTuple):
    """Result of one quantisation.

    quantized: (..., D) straight-through output (forward value = code, gradient = identity to the input).
    ids: (...,) int64 code indices.
    loss: scalar VQ loss (0 for the codebook term under EMA).
    usage: fraction of codes used in this call, in [0, 1].
    perplexity: exp(entropy) of the code histogram of this call, in [1, K].
    """

    quantized: Tensor
    ids: Tensor
    loss: Tensor
    usage: Tensor
    perplexity: Tensor


def codebook_stats(ids: Tensor, codebook_size: int) -> tuple[Tensor, Tensor]:
    """Usage fraction and perplexity of a set of code ids.

    Args:
        ids: integer tensor of any shape, values in [0, codebook_size).
        codebook_size: K.

    Returns:
        (usage, perplexity): usage = #distinct ids / K; perplexity = exp(-sum p log p) of the histogram.
    """
    if ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise TypeError(f"ids must be an integer tensor, got {ids.dtype}")
    if ids.numel() == 0:
        raise ValueError("ids is empty")
    if int(ids.min()) < 0 or int(ids.max()) >= codebook_size:
        raise ValueError(f"ids must lie in [0, {codebook_size}), got range [{int(ids.min())}, {int(ids.max())}]")
    counts = torch.bincount(ids.reshape(-1).long(), minlength=codebook_size).float()  # (K,)
    p = counts / counts.sum()
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    return (counts > 0).float().mean(), entropy.exp()


def kmeans(x: Tensor, k: int, iters: int, cosine: bool = False) -> Tensor:
    """Lloyd's k-means on rows of x, seeded from the global torch RNG.

    Args:
        x: (M, D) vectors; when M < k, centres are drawn with replacement (duplicates are fine: dead-code
            restart or EMA separates them later).
        k: number of centres.
        iters: Lloyd iterations.
        cosine: assign by cosine similarity and keep centres unit-norm.

    Returns:
        (k, D) centres.
    """
    if x.dim() != 2:
        raise ValueError(f"x must be (M, D), got shape {tuple(x.shape)}")
    m = x.shape[0]
    idx = torch.randperm(m, device=x.device)[:k] if m >= k else torch.randint(0, m, (k,), device=x.device)
    centres = x[idx].clone()  # (k, D)
    for _ in range(iters):
        if cosine:
            assign = (F.normalize(x, dim=-1) @ F.normalize(centres, dim=-1).T).argmax(-1)  # (M,)
        else:
            assign = torch.cdist(x, centres).argmin(-1)  # (M,)
        sums = torch.zeros_like(centres).index_add_(0, assign, x)  # (k, D)
        counts = torch.bincount(assign, minlength=k).unsqueeze(-1).to(x.dtype)  # (k, 1)
        # Empty clusters keep their old centre instead of collapsing to zero.
        centres = torch.where(counts > 0, sums / counts.clamp(min=1), centres)
        if cosine:
            centres = F.normalize(centres, dim=-1)
    return centres


class VectorQuantizer(nn.Module):
    """Nearest-code quantizer over the last dimension.

    Input (..., D) -> VQOutput with quantized (..., D) and ids (...,).
    """

    def __init__(self, config: VQConfig) -> None:
        super().__init__()
        self.config = config
        k, d = config.codebook_size, config.dim
        # taming/SEED initialisation: uniform(-1/K, 1/K).
        weight = torch.empty(k, d).uniform_(-1.0 / k, 1.0 / k)
        if config.distance == "cosine":
            weight = F.normalize(torch.randn(k, d), dim=-1)
        if config.ema_decay is None:
            self.codebook = nn.Parameter(weight)
        else:
            self.register_buffer("codebook", weight)
            self.register_buffer("ema_count", torch.ones(k))
            self.register_buffer("ema_sum", weight.clone())
        self.register_buffer("usage_ema", torch.full((k,), float(config.dead_code_threshold) + 1.0))
        self.register_buffer("initted", torch.tensor(not config.kmeans_init))

    @property
    def codebook_size(self) -> int:
        return self.config.codebook_size

    def _codes(self) -> Tensor:
        """(K, D) codebook as used for distances (unit-norm under cosine)."""
        return F.normalize(self.codebook, dim=-1) if self.config.distance == "cosine" else self.codebook

    def nearest(self, z: Tensor) -> Tensor:
        """Code index of each row. z: (M, D) -> (M,) int64 (ties go to the lower index, as argmin does)."""
        codes = self._codes()
        if self.config.distance == "cosine":
            return (F.normalize(z, dim=-1) @ codes.T).argmax(-1)
        # ||z||^2 - 2 z.e + ||e||^2, the taming formula; cheaper than cdist and exact enough for argmin.
        dist = z.pow(2).sum(-1, keepdim=True) - 2 * z @ codes.T + codes.pow(2).sum(-1)  # (M, K)
        return dist.argmin(-1)

    def lookup(self, ids: Tensor) -> Tensor:
        """Codes for ids: (...,) int64 -> (..., D)."""
        if ids.dtype != torch.int64:
            raise TypeError(f"ids must be int64, got {ids.dtype}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.codebook_size):
            raise ValueError(f"ids must lie in [0, {self.codebook_size}), got [{int(ids.min())}, {int(ids.max())}]")
        return F.embedding(ids, self._codes())

    @torch.no_grad()
    def _maybe_init(self, flat: Tensor) -> None:
        if bool(self.initted):
            return
        cos = self.config.distance == "cosine"
        centres = kmeans(flat.detach(), self.codebook_size, self.config.kmeans_iters, cosine=cos)
        self.codebook.data.copy_(centres)
        if self.config.ema_decay is not None:
            self.ema_sum.copy_(centres)
            self.ema_count.fill_(1.0)
        self.initted.fill_(True)

    @torch.no_grad()
    def _ema_update(self, flat: Tensor, ids: Tensor) -> None:
        decay, k = self.config.ema_decay, self.codebook_size
        one_hot = F.one_hot(ids, k).to(flat.dtype)  # (M, K)
        src = F.normalize(flat, dim=-1) if self.config.distance == "cosine" else flat
        self.ema_count.mul_(decay).add_(one_hot.sum(0), alpha=1 - decay)
        self.ema_sum.mul_(decay).add_(one_hot.T @ src, alpha=1 - decay)  # (K, D)
        # Laplace smoothing keeps never-used codes from dividing by zero.
        n = self.ema_count.sum()
        count = (self.ema_count + 1e-5) / (n + k * 1e-5) * n
        self.codebook.copy_(self.ema_sum / count.unsqueeze(-1))

    @torch.no_grad()
    def _restart_dead(self, flat: Tensor, ids: Tensor) -> None:
        cfg = self.config
        counts = torch.bincount(ids, minlength=self.codebook_size).to(flat.dtype)
        self.usage_ema.mul_(cfg.usage_decay).add_(counts, alpha=1 - cfg.usage_decay)
        if cfg.dead_code_threshold <= 0:
            return
        dead = (self.usage_ema < cfg.dead_code_threshold).nonzero().squeeze(-1)  # (n_dead,)
        if dead.numel() == 0:
            return
        pick = torch.randint(0, flat.shape[0], (dead.numel(),), device=flat.device)
        fresh = flat[pick].detach()
        if cfg.distance == "cosine":
            fresh = F.normalize(fresh, dim=-1)
        self.codebook.data[dead] = fresh
        if cfg.ema_decay is not None:
            self.ema_sum[dead] = fresh
            self.ema_count[dead] = 1.0
        # A restarted code gets a fresh grace period.
        self.usage_ema[dead] = cfg.dead_code_threshold + 1.0

    def forward(self, z: Tensor) -> VQOutput:
        """Quantise z: (..., D). Training mode updates the codebook state (k-means, EMA, restarts)."""
        cfg = self.config
        if z.dim() < 1 or z.shape[-1] != cfg.dim:
            raise ValueError(f"expected last dimension {cfg.dim}, got input of shape {tuple(z.shape)}")
        flat = z.reshape(-1, cfg.dim)  # (M, D), M = prod(leading dims)
        if self.training:
            self._maybe_init(flat)
        ids = self.nearest(flat)  # (M,)
        if cfg.distance == "cosine":
            z_in = F.normalize(flat, dim=-1)
        else:
            z_in = flat
        zq = F.embedding(ids, self._codes())  # (M, D)

        commit = F.mse_loss(z_in, zq.detach())  # pulls the encoder to its code
        if cfg.ema_decay is None:
            book = F.mse_loss(zq, z_in.detach())  # pulls the code to the encoder output
            w_commit, w_book = (1.0, cfg.beta) if cfg.legacy else (cfg.beta, 1.0)
            loss = w_commit * commit + w_book * book
        else:
            loss = cfg.beta * commit

        if self.training:
            if cfg.ema_decay is not None:
                self._ema_update(flat.detach(), ids)
            self._restart_dead(flat.detach(), ids)

        quantized = z_in + (zq - z_in).detach()  # straight-through estimator
        usage, perplexity = codebook_stats(ids, cfg.codebook_size)
        return VQOutput(quantized.reshape(z.shape), ids.reshape(z.shape[:-1]), loss, usage, perplexity)

    def extra_repr(self) -> str:
        c = self.config
        return (f"K={c.codebook_size}, D={c.dim}, distance={c.distance}, ema={c.ema_decay}, "
                f"kmeans={c.kmeans_init}, dead<{c.dead_code_threshold}")

