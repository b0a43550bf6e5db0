"""Configs of the small SEED re-implementation: the CLIP-trained encoder, the causal Q-Former, the tokenizer heads.

Sizes default to what trains on 2 CPU cores in minutes (see tokenizers_visual/README.md); the paper's sizes are
in the comments for comparison.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ..vq import VQConfig

__all__ = ["ClipConfig", "QFormerConfig", "SeedConfig", "TokenizerHeadConfig"]


def _positive(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


@dataclass
class ClipConfig:
    """Tiny CLIP: a timm ViT image tower and a word-level transformer text tower (SEED: EVA-CLIP ViT-g/14)."""

    image_size: int = 32
    patch_size: int = 4
    width: int = 96
    depth: int = 4
    heads: int = 4
    text_width: int = 96
    text_depth: int = 2
    text_heads: int = 4
    text_length: int = 12
    vocab_size: int = 20
    embed_dim: int = 64  # joint CLIP space; also the "generation embedding" target width

    def __post_init__(self) -> None:
        for name in ("image_size", "patch_size", "width", "depth", "heads", "text_width", "text_depth",
                     "text_heads", "text_length", "vocab_size", "embed_dim"):
            _positive(name, getattr(self, name))
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size={self.image_size} must be divisible by patch_size={self.patch_size}")
        if self.width % self.heads:
            raise ValueError(f"width={self.width} must be divisible by heads={self.heads}")
        if self.text_width % self.text_heads:
            raise ValueError(f"text_width={self.text_width} must be divisible by text_heads={self.text_heads}")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass
class QFormerConfig:
    """Causal Q-Former (SEED: BERT-base, 12 layers, 32 queries, cross-attention every 2nd layer)."""

    num_queries: int = 8
    width: int = 128
    depth: int = 3
    heads: int = 4
    mlp_ratio: float = 2.0
    proj_dim: int = 64  # ITC space (SEED: 256)

    def __post_init__(self) -> None:
        for name in ("num_queries", "width", "depth", "heads", "proj_dim"):
            _positive(name, getattr(self, name))
        if self.width % self.heads:
            raise ValueError(f"width={self.width} must be divisible by heads={self.heads}")
        if not self.mlp_ratio > 0:
            raise ValueError(f"mlp_ratio must be > 0, got {self.mlp_ratio!r}")


@dataclass
class TokenizerHeadConfig:
    """Stage-2 heads around the quantizer and the loss weights (SEED: 5 L_vq + 2 L_rec + 0.5 L_gen)."""

    rec_depth: int = 2  # causal-embedding reconstructor blocks (SEED: 4)
    gen_depth: int = 1  # generation branch blocks (SEED: 4 + reverse Q-Former or MLP)
    gen_token_dim: int = 16  # per-token width before flattening into the generation embedding (SEED: 32)
    w_vq: float = 5.0
    w_rec: float = 2.0
    w_gen: float = 0.5

    def __post_init__(self) -> None:
        for name in ("rec_depth", "gen_depth", "gen_token_dim"):
            _positive(name, getattr(self, name))
        for name in ("w_vq", "w_rec", "w_gen"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")


@dataclass
class SeedConfig:
    """Everything needed to rebuild a SEED tokenizer from its JSON config."""

    clip: ClipConfig = field(default_factory=ClipConfig)
    qformer: QFormerConfig = field(default_factory=QFormerConfig)
    vq: VQConfig = field(default_factory=lambda: VQConfig(codebook_size=512, dim=32))
    heads: TokenizerHeadConfig = field(default_factory=TokenizerHeadConfig)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "SeedConfig":
        unknown = set(d) - {"clip", "qformer", "vq", "heads"}
        if unknown:
            raise ValueError(f"unknown SeedConfig keys: {sorted(unknown)}")
        return cls(clip=ClipConfig(**d.get("clip", {})), qformer=QFormerConfig(**d.get("qformer", {})),
                   vq=VQConfig(**d.get("vq", {})), heads=TokenizerHeadConfig(**d.get("heads", {})))
