"""Autoregressive roll-out of any next-token predictor, and how fast its error grows with the step.

A predictor is a callable ``predict(seq, position) -> (B, P)``: it sees the working sequence seq (B, K, P), in
which every token at or after `position` is filler (or the truth where the caller chose to keep it, which a fair
predictor must not read), and returns its guess of token `position`. Models ignore `position` (their next head
finds the boundary itself); hand-made references in the tests use it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["Predictor", "growth_slope", "rollout_errors"]

Predictor = Callable[[Tensor, int], Tensor]


@torch.no_grad()
def rollout_errors(predict: Predictor, start_seq: Tensor, truth: Tensor, start: int, length: int) -> list[float]:
    """MSE against `truth` at roll-out steps 1..length.

    start_seq: (B, K, P) tokens < start are given, the rest filler; truth: (B, K, P). Step j (1-based) predicts
    token start + j - 1 and writes the prediction into the sequence, so later steps build on earlier guesses.
    """
    if start_seq.shape != truth.shape or start_seq.dim() != 3:
        raise ValueError(f"start_seq and truth must both be (B, K, P), got {tuple(start_seq.shape)} and "
                         f"{tuple(truth.shape)}")
    if not 1 <= start < start + length <= truth.shape[1]:
        raise ValueError(f"need 1 <= start < start + length <= {truth.shape[1]}, got start={start}, length={length}")
    seq, errs = start_seq.clone(), []
    for j in range(length):
        position = start + j
        pred = predict(seq, position)  # (B, P)
        errs.append(F.mse_loss(pred, truth[:, position]).item())
        seq[:, position] = pred  # the predictor's own guess becomes context
    return errs


def growth_slope(errors: Sequence[float]) -> float:
    """Least-squares slope of log(error) against log(step), steps 1..len(errors): 1 for error ~ step (O(K)),
    0.5 for error ~ sqrt(step), 0 for flat."""
    if len(errors) < 2 or min(errors) <= 0:
        raise ValueError(f"need >= 2 positive errors, got {list(errors)!r}")
    xs = [math.log(i + 1) for i in range(len(errors))]
    ys = [math.log(e) for e in errors]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
