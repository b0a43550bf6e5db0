"""Tiny CLIP trained here: a timm VisionTransformer image tower and a small transformer text tower.

It stands in for SEED's frozen EVA-CLIP ViT: trained once with the symmetric InfoNCE loss on generated
image-caption pairs, then frozen. Its patch tokens feed the Q-Former; its image embedding is the MSE target of
the generation head (the stand-in for the unCLIP image embedding).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from .config import ClipConfig

__all__ = ["TinyClip", "clip_loss"]

# Fixed pixel normalisation: the generated images live in [0, 1] with most mass around 0.4.
_PIXEL_MEAN, _PIXEL_STD = 0.45, 0.25


def clip_loss(img: Tensor, txt: Tensor, logit_scale: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """Symmetric InfoNCE. img, txt: (B, E) unit-norm; logit_scale: scalar log-temperature^-1. Returns a scalar."""
    if img.shape != txt.shape:
        raise ValueError(f"image and text embeddings differ in shape: {tuple(img.shape)} vs {tuple(txt.shape)}")
    logits = logit_scale.exp().clamp(max=100.0) * img @ txt.T  # (B, B)
    target = torch.arange(img.shape[0], device=img.device)
    return 0.5 * (F.cross_entropy(logits, target, label_smoothing=label_smoothing)
                  + F.cross_entropy(logits.T, target, label_smoothing=label_smoothing))


class TinyClip(nn.Module):
    """Image tower (timm ViT, class token) + text tower ([CLS]-pooled transformer) + projections."""

    def __init__(self, config: ClipConfig) -> None:
        super().__init__()
        self.config = c = config
        self.visual = VisionTransformer(img_size=c.image_size, patch_size=c.patch_size, in_chans=3, num_classes=0,
                                        embed_dim=c.width, depth=c.depth, num_heads=c.heads, mlp_ratio=2.0,
                                        global_pool="token")
        self.token_embed = nn.Embedding(c.vocab_size, c.text_width)
        self.pos_embed = nn.Parameter(torch.randn(c.text_length, c.text_width) * 0.02)
        layer = nn.TransformerEncoderLayer(c.text_width, c.text_heads, dim_feedforward=2 * c.text_width,
                                           dropout=0.0, batch_first=True, norm_first=True)
        self.text = nn.TransformerEncoder(layer, c.text_depth, enable_nested_tensor=False)
        self.text_norm = nn.LayerNorm(c.text_width)
        self.image_proj = nn.Linear(c.width, c.embed_dim, bias=False)
        self.text_proj = nn.Linear(c.text_width, c.embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def _check_pixels(self, pixels: Tensor) -> None:
        s = self.config.image_size
        if pixels.dim() != 4 or pixels.shape[1:] != (3, s, s):
            raise ValueError(f"pixels must be (B, 3, {s}, {s}), got {tuple(pixels.shape)}")
        if not pixels.is_floating_point():
            raise TypeError(f"pixels must be a float tensor in [0, 1], got {pixels.dtype}")

    def image_tokens(self, pixels: Tensor) -> Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, 1 + P, width): final-norm ViT tokens ([CLS] first)."""
        self._check_pixels(pixels)
        return self.visual.forward_features((pixels - _PIXEL_MEAN) / _PIXEL_STD)

    def image_embed(self, pixels: Tensor, tokens: Tensor | None = None) -> Tensor:
        """(B, 3, H, W) -> (B, E) unit-norm image embedding (from the [CLS] token)."""
        tokens = self.image_tokens(pixels) if tokens is None else tokens
        return F.normalize(self.image_proj(tokens[:, 0]), dim=-1)

    def text_features(self, ids: Tensor) -> Tensor:
        """(B, L) word ids ([CLS] first, 0 = pad) -> (B, text_width) pooled [CLS] features."""
        if ids.dim() != 2 or ids.shape[1] != self.config.text_length:
            raise ValueError(f"ids must be (B, {self.config.text_length}), got {tuple(ids.shape)}")
        x = self.token_embed(ids) + self.pos_embed  # (B, L, Wt)
        x = self.text(x, src_key_padding_mask=ids == 0)
        return self.text_norm(x[:, 0])

    def text_embed(self, ids: Tensor) -> Tensor:
        """(B, L) -> (B, E) unit-norm text embedding."""
        return F.normalize(self.text_proj(self.text_features(ids)), dim=-1)

    def forward(self, pixels: Tensor, ids: Tensor) -> Tensor:
        """CLIP loss of a batch of matched pairs."""
        return clip_loss(self.image_embed(pixels), self.text_embed(ids), self.logit_scale)
