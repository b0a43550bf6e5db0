"""TokenUnify model: linear token embedding + bidirectional Mamba + pixel head, next-token head, affinity head.

Losses as the official code has them (all MSE after a sigmoid, averaged over every voxel):
- random tokens: ``MSE(sigmoid(pixel_head(f(x_masked))), x)`` over the whole input, not only masked tokens;
- next token: ``MSE(sigmoid(next_head(f(x_prefix))), x_k)``, the next head pooling all positions with one
  learned query (the paper's "Perceiver resampler" stand-in);
- next-all: ``MSE(sigmoid(pixel_head(f(x_prefix))), x)``;
- TokenUnify stage 2: next + next-all, 1:1 (``--auto_mode 1``).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .mamba import BiMambaBlock
from .tokens import patchify, prefix_corrupt, random_token_corrupt, sample_prefix

__all__ = ["DATA_KINDS", "OBJECTIVES", "TokenUnifyConfig", "TokenUnifyModel"]

OBJECTIVES = ("masked", "next", "next_all", "tokenunify")
DATA_KINDS = ("em", "volumes")  # data.make_volumes (EM-like) or volumes.make_moving_volumes (moving discs)


@dataclass
class TokenUnifyConfig:
    """Volume/patch geometry and backbone size (paper: 16x160x160 crops, 4x16x16 patches, SegMamba 28M+)."""

    volume: tuple[int, ...] = (8, 32, 32)
    patch: tuple[int, ...] = (2, 8, 8)
    width: int = 48
    depth: int = 3
    d_state: int = 4
    expand: int = 2
    mask_ratio: float = 0.4
    data: str = "em"

    def __post_init__(self) -> None:
        self.volume, self.patch = tuple(self.volume), tuple(self.patch)
        if len(self.volume) not in (2, 3) or len(self.patch) != len(self.volume):
            raise ValueError(f"volume {self.volume} and patch {self.patch} must both be 2-D or both 3-D")
        if any(p < 1 or v % p for v, p in zip(self.volume, self.patch)):
            raise ValueError(f"volume {self.volume} must be divisible by patch {self.patch}")
        for name in ("width", "depth", "d_state", "expand"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if not 0 < self.mask_ratio < 1:
            raise ValueError(f"mask_ratio must be in (0, 1), got {self.mask_ratio!r}")
        if self.data not in DATA_KINDS:
            raise ValueError(f"data must be one of {DATA_KINDS}, got {self.data!r}")

    @property
    def grid(self) -> tuple[int, ...]:
        """Tokens along each axis, (g0[, g1], g_last); tokens run in raster order over this grid."""
        return tuple(v // p for v, p in zip(self.volume, self.patch))

    @property
    def num_tokens(self) -> int:
        return math.prod(self.grid)

    @property
    def patch_voxels(self) -> int:
        return math.prod(self.patch)


class TokenUnifyModel(nn.Module):
    """(B, K, P) tokens -> (B, K, width) features; heads map features to pixels, the next token, affinities."""

    def __init__(self, config: TokenUnifyConfig) -> None:
        super().__init__()
        self.config = c = config
        self.embed = nn.Linear(c.patch_voxels, c.width)
        self.pos = nn.Parameter(torch.randn(c.num_tokens, c.width) * 0.02)
        self.blocks = nn.ModuleList(BiMambaBlock(c.width, c.d_state, c.expand) for _ in range(c.depth))
        self.norm = nn.LayerNorm(c.width)
        self.pixel_head = nn.Linear(c.width, c.patch_voxels)
        self.next_query = nn.Parameter(torch.randn(1, 1, c.width) * 0.02)
        self.next_attn = nn.MultiheadAttention(c.width, 4 if c.width % 4 == 0 else 1, batch_first=True)
        self.next_head = nn.Linear(c.width, c.patch_voxels)
        # Downstream: 3 (or 2) affinity channels per voxel of each patch.
        self.affinity_head = nn.Linear(c.width, len(c.volume) * c.patch_voxels)

    def features(self, tokens: Tensor) -> Tensor:
        """(B, K, P) -> (B, K, width)."""
        c = self.config
        if tokens.dim() != 3 or tokens.shape[1:] != (c.num_tokens, c.patch_voxels):
            raise ValueError(f"tokens must be (B, {c.num_tokens}, {c.patch_voxels}), got {tuple(tokens.shape)}")
        x = self.embed(tokens) + self.pos
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def reconstruct(self, tokens: Tensor, feats: Tensor | None = None) -> Tensor:
        """(B, K, P) corrupted -> (B, K, P) in [0, 1]. Pass feats = features(tokens) to reuse them."""
        feats = self.features(tokens) if feats is None else feats
        return torch.sigmoid(self.pixel_head(feats))

    def predict_next(self, tokens: Tensor, feats: Tensor | None = None) -> Tensor:
        """(B, K, P) prefix-corrupted -> (B, P) in [0, 1]: the first replaced token."""
        feats = self.features(tokens) if feats is None else feats
        query = self.next_query.expand(feats.shape[0], -1, -1)  # (B, 1, W)
        pooled = self.next_attn(query, feats, feats, need_weights=False)[0]
        return torch.sigmoid(self.next_head(pooled[:, 0]))  # (B, 1, W) -> (B, P)

    def affinity_logits(self, tokens: Tensor) -> Tensor:
        """(B, K, P) -> (B, K, nd * P) affinity logits (token-major; see experiment.unpatchify_affinities)."""
        return self.affinity_head(self.features(tokens))

    def loss(self, volumes: Tensor, objective: str, generator: torch.Generator | None = None) -> Tensor:
        """Pretraining loss of (B, *volume) volumes in [0, 1] under one objective of OBJECTIVES."""
        if objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
        x = patchify(volumes, self.config.patch)  # (B, *V) -> (B, K, P)
        if objective == "masked":
            corrupted, _ = random_token_corrupt(x, self.config.mask_ratio, "zero", generator)
            return F.mse_loss(self.reconstruct(corrupted), x)
        k = sample_prefix(x.shape[0], x.shape[1], generator)
        corrupted, target = prefix_corrupt(x, k, "noise", generator)
        feats = self.features(corrupted)  # one backbone pass serves both heads
        total = volumes.new_zeros(())
        if objective in ("next", "tokenunify"):
            total = total + F.mse_loss(self.predict_next(corrupted, feats), target)
        if objective in ("next_all", "tokenunify"):
            total = total + F.mse_loss(self.reconstruct(corrupted, feats), x)
        return total

    # ----- persistence -----
    def save(self, folder: str | Path, extra: dict | None = None) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps({**asdict(self.config), **(extra or {})}, indent=2) + "\n")
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(folder / "model.safetensors"))

    @classmethod
    def load(cls, folder: str | Path) -> TokenUnifyModel:
        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"{folder} has no config.json")
        raw = json.loads((folder / "config.json").read_text())
        fields = TokenUnifyConfig.__dataclass_fields__
        model = cls(TokenUnifyConfig(**{k: v for k, v in raw.items() if k in fields}))
        model.load_state_dict(load_file(str(folder / "model.safetensors")))
        return model
