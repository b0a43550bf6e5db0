"""The one optimiser of the testbed's training loops: AdamW with a linear warm-up then a cosine decay.

    schedule = WarmupCosine(peak=2e-3, warmup=30, steps=1200, floor=0.05)
    optimizer = WarmupCosineAdamW(params, schedule, weight_decay=0.01)
    for step in range(1200):
        lr = optimizer.step(loss_of(step), step)   # zero_grad, backward, clip to norm 1, AdamW step

Both loops share it, and each keeps the arithmetic its shipped checkpoints were trained with, to the last bit:

| loop | cosine ends at | warm-up lr at step s | weight decay |
|---|---|---|---|
| `train-tiny` (language steps) | 5% of the peak (`floor=0.05`) | `peak * (s + 1) / warmup` | matrices only |
| `train-tiny` (image-only steps) | 5% of the peak | `peak * (s + 1) / warmup` | every parameter |
| `train-seed-vlm` | 0 | `peak * ((s + 1) / warmup)` (`fraction_first=True`) | matrices only |

The two warm-up forms are equal in exact arithmetic but round differently for some steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

import torch

__all__ = ["WarmupCosine", "WarmupCosineAdamW"]


@dataclass(frozen=True)
class WarmupCosine:
    """Learning rate by step: linear warm-up to `peak` over `warmup` steps (step s gets (s + 1) / warmup of it),
    then a half cosine from `peak` down to `floor * peak` at step `steps`.

    fraction_first: compute the warm-up as peak * ((s + 1) / warmup) instead of peak * (s + 1) / warmup (see the
    module docstring: same value up to rounding, kept so that each loop reproduces its checkpoints exactly).
    """

    peak: float
    warmup: int
    steps: int
    floor: float = 0.0
    fraction_first: bool = False

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            if self.fraction_first:
                return self.peak * ((step + 1) / self.warmup)
            return self.peak * (step + 1) / self.warmup
        progress = (step - self.warmup) / max(1, self.steps - self.warmup)
        return self.peak * (self.floor + (1 - self.floor) * 0.5 * (1 + math.cos(math.pi * progress)))


class WarmupCosineAdamW:
    """AdamW (betas 0.9, 0.98) at the learning rate of `schedule`, gradients clipped to norm `clip_norm`.

    params: the trained parameters, in a fixed order (the clipping norm sums over them in that order).
    decay_matrices_only: weight decay on parameters of two or more dimensions only (biases and norm gains are
    not decayed), else on every parameter.
    """

    def __init__(self, params: Iterable[torch.nn.Parameter], schedule: WarmupCosine, weight_decay: float,
                 decay_matrices_only: bool = True, clip_norm: float = 1.0):
        self.params = list(params)
        self.schedule = schedule
        self.clip_norm = clip_norm
        betas = (0.9, 0.98)
        if decay_matrices_only:
            groups = [{"params": [p for p in self.params if p.dim() >= 2], "weight_decay": weight_decay},
                      {"params": [p for p in self.params if p.dim() < 2], "weight_decay": 0.0}]
            self.optimizer = torch.optim.AdamW(groups, lr=schedule.peak, betas=betas)
        else:
            self.optimizer = torch.optim.AdamW(self.params, lr=schedule.peak, betas=betas, weight_decay=weight_decay)

    def step(self, loss: torch.Tensor, step: int) -> float:
        """Back-propagate `loss` and take training step `step`; returns the learning rate it used."""
        lr = self.schedule(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.clip_norm)
        self.optimizer.step()
        return lr
