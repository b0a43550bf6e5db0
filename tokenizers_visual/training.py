"""A small shared training loop: AdamW, linear warm-up + cosine decay, tqdm bar, JSON-lines log."""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

__all__ = ["cosine_lr", "seed_everything", "train_steps"]


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU) RNGs."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def cosine_lr(step: int, steps: int, lr: float, warmup: int, final_ratio: float = 0.1) -> float:
    """Learning rate at step: linear warm-up to lr over `warmup` steps, then cosine down to lr * final_ratio."""
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return lr * (final_ratio + (1 - final_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


def train_steps(params: Iterable[nn.Parameter], step_fn: Callable[[int], tuple[Tensor, dict[str, float]]],
                steps: int, lr: float, *, warmup: int = 100, weight_decay: float = 0.05,
                betas: tuple[float, float] = (0.9, 0.98), log_path: str | Path | None = None, desc: str = "train",
                log_every: int = 50, grad_clip: float = 1.0) -> list[dict[str, float]]:
    """Run `steps` optimiser steps; step_fn(step) returns (loss, scalars to log). Returns the logged records."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameters")
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=betas)
    records: list[dict[str, float]] = []
    log = open(log_path, "a") if log_path else None
    start = time.time()
    bar = tqdm(range(steps), desc=desc, mininterval=5.0)
    try:
        for step in bar:
            for group in opt.param_groups:
                group["lr"] = cosine_lr(step, steps, lr, warmup)
            loss, scalars = step_fn(step)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
            opt.step()
            if step % log_every == 0 or step == steps - 1:
                rec = {"step": step, "loss": float(loss.detach()), "lr": opt.param_groups[0]["lr"],
                       "elapsed_s": round(time.time() - start, 1), **scalars}
                records.append(rec)
                bar.set_postfix({k: round(v, 4) for k, v in rec.items() if k in ("loss", *scalars)})
                if log:
                    log.write(json.dumps({"phase": desc, **rec}) + "\n")
                    log.flush()
    finally:
        if log:
            log.close()
    return records
