"""A pure-PyTorch Mamba (selective state-space) layer and its bidirectional block; runs on CPU.

The official TokenUnify backbone (SegMamba, ``bimamba_type="v3"``) sums separately parameterised scans over
the sequence and its flip (plus interleaved slices) with a CUDA-only kernel. Here the selective scan is a
plain loop over the sequence, which is fast enough for the 64-256 tokens used in this repository.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["BiMambaBlock", "MambaMixer", "selective_scan"]


def selective_scan(x: Tensor, dt: Tensor, a: Tensor, b: Tensor, c: Tensor, d: Tensor) -> Tensor:
    """y_t = C_t . h_t + D x_t with h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t (zero-order hold, h_0 = 0).

    Args:
        x, dt: (B, L, Di); a: (Di, N) (negative); b, c: (B, L, N); d: (Di,).

    Returns:
        y: (B, L, Di).
    """
    decay = torch.exp(dt.unsqueeze(-1) * a)  # (B, L, Di, N)
    drive = dt.unsqueeze(-1) * b.unsqueeze(2) * x.unsqueeze(-1)  # (B, L, Di, N)
    h = torch.zeros_like(drive[:, 0])  # (B, Di, N)
    states = []
    # unbind, not decay[:, t]: indexing would make backward allocate a full (B, L, Di, N) zero tensor per step.
    for decay_t, drive_t in zip(decay.unbind(1), drive.unbind(1)):
        h = decay_t * h + drive_t
        states.append(h)
    hs = torch.stack(states, dim=1)  # (B, L, Di, N)
    return (hs * c.unsqueeze(2)).sum(-1) + x * d


class MambaMixer(nn.Module):
    """Causal Mamba mixer: (B, L, D) -> (B, L, D); output t depends on inputs 0..t only."""

    def __init__(self, d_model: int, d_state: int = 8, expand: int = 2, d_conv: int = 4) -> None:
        super().__init__()
        d_inner = expand * d_model
        self.dt_rank = math.ceil(d_model / 16)
        self.d_state = d_state
        self.in_proj = nn.Linear(d_model, 2 * d_inner)
        self.conv = nn.Conv1d(d_inner, d_inner, d_conv, groups=d_inner, padding=d_conv - 1)
        self.x_proj = nn.Linear(d_inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, d_inner)
        # Mamba's initialisation: dt in [1e-3, 1e-1] log-uniform (bias = softplus^-1(dt)), A = -(1..N).
        dt = torch.exp(torch.rand(d_inner) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        self.a_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(d_inner, 1))
        self.d = nn.Parameter(torch.ones(d_inner))
        self.out_proj = nn.Linear(d_inner, d_model)

    def forward(self, x: Tensor) -> Tensor:
        length = x.shape[1]
        u, z = self.in_proj(x).chunk(2, dim=-1)  # (B, L, Di) each
        # Causal depthwise conv: pad both sides, keep the first L outputs. (B, L, Di) -> (B, Di, L) -> back.
        u = F.silu(self.conv(u.transpose(1, 2))[..., :length].transpose(1, 2))
        dt, b, c = self.x_proj(u).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = F.softplus(self.dt_proj(dt))  # (B, L, Di)
        y = selective_scan(u, dt, -torch.exp(self.a_log), b, c, self.d)
        return self.out_proj(y * F.silu(z))


class BiMambaBlock(nn.Module):
    """Pre-norm residual block summing a forward scan and a scan of the reversed sequence (separate weights)."""

    def __init__(self, d_model: int, d_state: int = 8, expand: int = 2) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.fwd = MambaMixer(d_model, d_state, expand)
        self.bwd = MambaMixer(d_model, d_state, expand)

    def forward(self, x: Tensor) -> Tensor:
        """(B, L, D) -> (B, L, D)."""
        h = self.norm(x)
        return x + self.fwd(h) + self.bwd(h.flip(1)).flip(1)
