"""Training SEED here in three phases: CLIP (then frozen), stage 1 (causal Q-Former, ITC), stage 2 (tokenizer).

Data: a fixed pool of generated pairs (seed ``data_seed``); batches are drawn from it with a seeded generator.
Stage 2 can start from an earlier checkpoint's CLIP + Q-Former (``init``) so that quantizer variants share
everything before the VQ.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..training import seed_everything, train_steps
from .config import SeedConfig
from .data import CaptionVocab, make_pairs
from .model import SeedModel
from .tokenizer import SeedTokenizer

__all__ = ["SeedTrainConfig", "train_seed"]

_STAGES = ("all", "tokenizer")


@dataclass
class SeedTrainConfig:
    """Steps and optimiser settings of the three phases."""

    clip_steps: int = 1200
    qformer_steps: int = 600
    tokenizer_steps: int = 1500
    batch_size: int = 128
    clip_lr: float = 1e-3
    qformer_lr: float = 5e-4
    tokenizer_lr: float = 1e-3
    train_pairs: int = 20000
    data_seed: int = 0
    seed: int = 0
    stage: str = "all"

    def __post_init__(self) -> None:
        for name in ("clip_steps", "qformer_steps", "tokenizer_steps", "batch_size", "train_pairs"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        for name in ("clip_lr", "qformer_lr", "tokenizer_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if self.stage not in _STAGES:
            raise ValueError(f"stage must be one of {_STAGES}, got {self.stage!r}")


def _batches(pixels: Tensor, ids: Tensor, batch: int, seed: int):
    gen = torch.Generator().manual_seed(seed)

    def get(_step: int) -> tuple[Tensor, Tensor]:
        idx = torch.randint(0, pixels.shape[0], (batch,), generator=gen)
        return pixels[idx], ids[idx]

    return get


def train_seed(config: SeedConfig, train: SeedTrainConfig, out_dir: str | Path, init: str | Path | None = None,
               log_path: str | Path | None = None) -> SeedTokenizer:
    """Train and save a SEED tokenizer to out_dir. Returns it (in eval mode)."""
    seed_everything(train.seed)
    t0 = time.time()
    pixels, captions = make_pairs(train.train_pairs, seed=train.data_seed, size=config.clip.image_size)
    text_ids = CaptionVocab().encode(captions, config.clip.text_length)
    model = SeedModel(config)
    if train.stage == "tokenizer":
        if init is None:
            raise ValueError("stage='tokenizer' needs init= a checkpoint with a trained CLIP and Q-Former")
        done = SeedTokenizer.load(init).model.state_dict()
        keep = {k: v for k, v in done.items() if k.split(".")[0] in ("clip", "qformer", "vision_proj", "text_proj",
                                                                      "itc_logit_scale")}
        model.load_state_dict(keep, strict=False)  # stage-2 modules stay freshly initialised
    else:
        params = model.trainable("clip")
        get = _batches(pixels, text_ids, train.batch_size, train.seed)

        def clip_step(step: int):
            px, ids = get(step)
            return model.clip(px, ids), {"tau": float(model.clip.logit_scale.exp())}

        model.train()
        train_steps(params, clip_step, train.clip_steps, train.clip_lr, log_path=log_path, desc="clip")

        params = model.trainable("qformer")
        get = _batches(pixels, text_ids, train.batch_size, train.seed + 1)
        model.clip.eval()  # frozen from here on

        def q_step(step: int):
            px, ids = get(step)
            return model.stage1_loss(px, ids), {}

        train_steps(params, q_step, train.qformer_steps, train.qformer_lr, log_path=log_path, desc="qformer")

    params = model.trainable("tokenizer")
    model.eval()
    model.quantizer.train()  # only the quantizer's state (EMA, restarts) needs training mode
    # ViT and Q-Former are frozen in stage 2, so their outputs on the pool are computed once.
    with torch.no_grad():
        parts = [model.stage2_targets(pixels[i : i + 500]) for i in range(0, pixels.shape[0], 500)]
    causal_pool = torch.cat([p[0] for p in parts])  # (pool, N, W)
    target_pool = torch.cat([p[1] for p in parts])  # (pool, E)
    get = _batches(causal_pool, target_pool, train.batch_size, train.seed + 2)

    def tok_step(step: int):
        causal, target = get(step)
        out = model.stage2_from_targets(causal, target)
        return out.loss, {"vq": float(out.vq.loss), "rec_cos": float(out.rec_cos), "gen_mse": float(out.gen_mse),
                          "usage": float(out.vq.usage), "ppl": float(out.vq.perplexity)}

    train_steps(params, tok_step, train.tokenizer_steps, train.tokenizer_lr, log_path=log_path, desc="tokenizer",
                weight_decay=0.0)
    tok = SeedTokenizer(model)
    tok.save(out_dir)
    print(f"trained in {time.time() - t0:.0f} s -> {out_dir}")
    return SeedTokenizer.load(out_dir)
