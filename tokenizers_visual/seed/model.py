"""SEED model: frozen tiny CLIP -> causal Q-Former -> task layer -> VQ -> reconstructors, with both stages' losses.

Stage 1 (``stage1_loss``): ITC between the **last** causal query (vision_proj) and the text ([CLS] feature of
the frozen text tower, text_proj), label smoothing 0.1, learnable temperature starting at 0.07.
Stage 2 (``stage2_loss``): ViT and Q-Former frozen; ``w_vq L_vq + w_rec (1 - cos(rec, causal)) +
w_gen MSE(gen, target)`` where the generation target is the frozen CLIP image embedding (unit norm, scaled by
sqrt(E) so that chance-level MSE is about 1).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..vq import VectorQuantizer, VQOutput
from .clip import TinyClip, clip_loss
from .config import SeedConfig
from .qformer import CausalQFormer

__all__ = ["SeedModel", "Stage2Output"]


class Stage2Output(NamedTuple):
    """Stage-2 forward: losses (scalars) and tensors for metrics."""

    loss: Tensor
    vq: VQOutput
    rec_cos: Tensor  # mean cosine between reconstructed and causal embeddings
    gen_mse: Tensor
    causal: Tensor  # (B, N, W) Q-Former output (target)
    rec: Tensor  # (B, N, W) reconstruction from the ids


def _blocks(width: int, heads: int, depth: int) -> nn.TransformerEncoder:
    layer = nn.TransformerEncoderLayer(width, heads, dim_feedforward=2 * width, dropout=0.0, batch_first=True,
                                       norm_first=True)
    return nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)


class SeedModel(nn.Module):
    """All SEED parameters. Which ones train depends on the stage (see ``trainable``)."""

    def __init__(self, config: SeedConfig) -> None:
        super().__init__()
        self.config = config
        c, q, h = config.clip, config.qformer, config.heads
        self.clip = TinyClip(c)
        self.qformer = CausalQFormer(q, kv_dim=c.width)
        # Stage 1 heads (SEED: vision_proj / text_proj to 256-d, temp 0.07).
        self.vision_proj = nn.Linear(q.width, q.proj_dim)
        self.text_proj = nn.Linear(c.text_width, q.proj_dim)
        self.itc_logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        # Stage 2: encode_task_layer / decode_task_layer around the VQ, as SEED names them.
        d = config.vq.dim
        self.encode_task_layer = nn.Sequential(nn.Linear(q.width, q.width), nn.Tanh(), nn.Linear(q.width, d))
        self.quantizer = VectorQuantizer(config.vq)
        self.decode_task_layer = nn.Sequential(nn.Linear(d, q.width), nn.Tanh(), nn.Linear(q.width, q.width))
        self.rec_pos = nn.Parameter(torch.randn(q.num_queries, q.width) * 0.02)
        self.rec_blocks = _blocks(q.width, q.heads, h.rec_depth)
        self.rec_norm = nn.LayerNorm(q.width)
        self.gen_pos = nn.Parameter(torch.randn(q.num_queries, q.width) * 0.02)
        self.gen_blocks = _blocks(q.width, q.heads, h.gen_depth)
        self.gen_token = nn.Sequential(nn.LayerNorm(q.width), nn.Linear(q.width, h.gen_token_dim))
        self.gen_out = nn.Linear(q.num_queries * h.gen_token_dim, c.embed_dim)

    # ----- which parameters train in each stage -----
    def trainable(self, stage: str) -> list[nn.Parameter]:
        """Parameters trained in stage "clip", "qformer" (stage 1) or "tokenizer" (stage 2); the rest freeze."""
        groups = {
            "clip": [self.clip],
            "qformer": [self.qformer, self.vision_proj, self.text_proj],
            "tokenizer": [self.encode_task_layer, self.quantizer, self.decode_task_layer, self.rec_blocks,
                          self.rec_norm, self.gen_blocks, self.gen_token, self.gen_out],
        }
        if stage not in groups:
            raise ValueError(f"stage must be one of {sorted(groups)}, got {stage!r}")
        params = [p for m in groups[stage] for p in m.parameters()]
        if stage == "qformer":
            params.append(self.itc_logit_scale)
        if stage == "tokenizer":
            params += [self.rec_pos, self.gen_pos]
        for p in self.parameters():
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        return params

    # ----- embeddings -----
    def causal_embeddings(self, pixels: Tensor) -> tuple[Tensor, Tensor]:
        """(B, 3, H, W) -> causal (B, N, W) Q-Former output and the frozen image tokens (B, 1 + P, Wv)."""
        tokens = self.clip.image_tokens(pixels)
        return self.qformer(tokens), tokens

    def itc_image(self, causal: Tensor) -> Tensor:
        """(B, N, W) -> (B, proj) unit-norm ITC embedding of the last query."""
        return F.normalize(self.vision_proj(causal[:, -1]), dim=-1)

    def itc_text(self, text_ids: Tensor) -> Tensor:
        """(B, L) word ids -> (B, proj) unit-norm ITC text embedding (frozen text tower + text_proj)."""
        return F.normalize(self.text_proj(self.clip.text_features(text_ids)), dim=-1)

    def stage1_loss(self, pixels: Tensor, text_ids: Tensor) -> Tensor:
        causal, _ = self.causal_embeddings(pixels)
        return clip_loss(self.itc_image(causal), self.itc_text(text_ids), self.itc_logit_scale, label_smoothing=0.1)

    # ----- stage 2 -----
    def quantize(self, causal: Tensor) -> VQOutput:
        """(B, N, W) -> VQOutput with ids (B, N)."""
        return self.quantizer(self.encode_task_layer(causal))

    def reconstruct(self, codes: Tensor) -> tuple[Tensor, Tensor]:
        """Quantised codes (B, N, d) -> (rec (B, N, W), gen (B, E)): causal embeddings and generation embedding."""
        x = self.decode_task_layer(codes)  # (B, N, W)
        rec = self.rec_norm(self.rec_blocks(x + self.rec_pos))
        g = self.gen_token(self.gen_blocks(x + self.gen_pos))  # (B, N, gen_token_dim)
        gen = self.gen_out(g.flatten(1))  # (B, N * gen_token_dim) -> (B, E)
        return rec, gen

    def generation_target(self, tokens: Tensor) -> Tensor:
        """Frozen CLIP image embedding, unit norm times sqrt(E): (B, 1 + P, Wv) -> (B, E)."""
        e = self.clip.config.embed_dim
        return F.normalize(self.clip.image_proj(tokens[:, 0]), dim=-1) * math.sqrt(e)

    @torch.no_grad()
    def stage2_targets(self, pixels: Tensor) -> tuple[Tensor, Tensor]:
        """Frozen stage-2 inputs: (B, 3, H, W) -> causal (B, N, W) and generation target (B, E)."""
        causal, tokens = self.causal_embeddings(pixels)
        return causal, self.generation_target(tokens)

    def stage2_loss(self, pixels: Tensor) -> Stage2Output:
        return self.stage2_from_targets(*self.stage2_targets(pixels))

    def stage2_from_targets(self, causal: Tensor, target: Tensor) -> Stage2Output:
        """Stage-2 loss given precomputed frozen causal embeddings (B, N, W) and generation targets (B, E)."""
        vq = self.quantize(causal)
        rec, gen = self.reconstruct(vq.quantized)
        rec_cos = F.cosine_similarity(rec, causal, dim=-1).mean()
        gen_mse = F.mse_loss(gen, target)
        h = self.config.heads
        loss = h.w_vq * vq.loss + h.w_rec * (1 - rec_cos) + h.w_gen * gen_mse
        return Stage2Output(loss, vq, rec_cos, gen_mse, causal, rec)
