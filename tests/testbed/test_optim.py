"""optim: the one AdamW + warm-up/cosine helper reproduces each training loop's former optimizer exactly: the
learning rate at every step (formulas written out here as the loops had them) and the weights after a few steps."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from mmreduce.eval.testbed.optim import WarmupCosine, WarmupCosineAdamW


def tiny_lr(step: int, lr: float, warmup: int, steps: int) -> float:
    """train-tiny's schedule (language and image-only steps): warm-up, then cosine down to 5%."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


def seed_vlm_lr(step: int, lr: float, warmup: int, steps: int) -> float:
    """train-seed-vlm's schedule: warm-up, then cosine down to 0."""
    progress = max(0.0, (step - warmup) / max(1, steps - warmup))
    return lr * (min(1.0, (step + 1) / warmup) if step < warmup else 0.5 * (1 + math.cos(math.pi * progress)))


# The shipped recipes' settings, the defaults, and edge cases (no warm-up, warm-up as long as the run).
SETTINGS = [(2e-3, 30, 2150), (5e-4, 20, 300), (2e-3, 30, 1200), (1.5e-3, 60, 1200), (2e-3, 30, 1000),
            (1.5e-3, 100, 800), (1e-3, 7, 50), (3e-4, 0, 40), (1e-3, 10, 10), (5e-4, 1, 1)]


@pytest.mark.parametrize("lr, warmup, steps", SETTINGS)
def test_schedules_equal_the_loops_former_formulas_at_every_step(lr, warmup, steps):
    tiny = WarmupCosine(lr, warmup, steps, floor=0.05)
    seed_vlm = WarmupCosine(lr, warmup, steps, fraction_first=True)
    for step in range(steps):
        assert tiny(step) == tiny_lr(step, lr, warmup, steps), step
        assert seed_vlm(step) == seed_vlm_lr(step, lr, warmup, steps), step


def test_the_two_warmup_forms_are_not_interchangeable():
    """Why `fraction_first` exists: the two warm-up forms round differently for some steps."""
    plain, fraction_first = WarmupCosine(1.5e-3, 100, 800), WarmupCosine(1.5e-3, 100, 800, fraction_first=True)
    assert any(plain(s) != fraction_first(s) for s in range(100))
    assert all(plain(s) == pytest.approx(fraction_first(s), rel=1e-15) for s in range(800))


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 3))


def _loss(model: torch.nn.Module, step: int) -> torch.Tensor:
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(step))
    return model(x).pow(2).mean() * 50  # large enough that clipping to norm 1 acts


def _former_step(optim, params, loss, lr) -> None:
    """The loops' former step: set lr, zero grads, backward, clip to norm 1, AdamW step."""
    for group in optim.param_groups:
        group["lr"] = lr
    optim.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optim.step()


@pytest.mark.parametrize("decay_matrices_only", [True, False])
def test_optimizer_steps_equal_the_former_adamw_setups(decay_matrices_only):
    """Language steps and train-seed-vlm: decay on matrices only; image-only steps: decay on every parameter."""
    former, helper = _model(), _model()
    params = list(former.parameters())
    if decay_matrices_only:
        optim = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.01},
                                   {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                                  lr=2e-3, betas=(0.9, 0.98))
    else:
        optim = torch.optim.AdamW(params, lr=2e-3, betas=(0.9, 0.98), weight_decay=0.01)
    schedule = WarmupCosine(2e-3, 3, 8, floor=0.05)
    optimizer = WarmupCosineAdamW(helper.parameters(), schedule, 0.01, decay_matrices_only=decay_matrices_only)
    groups = [(len(g["params"]), g["weight_decay"], g["betas"]) for g in optimizer.optimizer.param_groups]
    assert groups == [(len(g["params"]), g["weight_decay"], g["betas"]) for g in optim.param_groups]
    start = copy.deepcopy(helper.state_dict())
    for step in range(8):
        _former_step(optim, params, _loss(former, step), tiny_lr(step, 2e-3, 3, 8))
        assert optimizer.step(_loss(helper, step), step) == tiny_lr(step, 2e-3, 3, 8)
    for (name, a), b in zip(former.state_dict().items(), helper.state_dict().values()):
        assert torch.equal(a, b), name
        assert not torch.equal(b, start[name]), name  # the steps did move every tensor
