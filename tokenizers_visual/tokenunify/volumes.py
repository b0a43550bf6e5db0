"""Volumes with continuous structure across slices: discs that move and grow linearly from slice to slice.

The EM-like volumes of `data.py` barely constrain the next token (a next-only model learns the mean token
there), so the roll-out claim cannot be judged on them. Here every slice z of a volume shows one or two soft
discs whose centre and radius are linear in z, on a flat background. Slice z+1 is then a deterministic function
of slices z-1 and z (extrapolate centre and radius), while copying slice z is off by the per-slice motion. With
the patch (1, H, W) one token is one slice, so "next token" means "next slice".
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

__all__ = ["MovingDiscSpec", "make_moving_volume", "make_moving_volumes"]


@dataclass(frozen=True)
class MovingDiscSpec:
    """How the discs of a volume are drawn.

    radius: (low, high) range of the radius in pixels at the first and at the last slice (drawn independently, so
    a disc may grow or shrink). max_discs: 1 or 2 discs per volume. edge: width of the soft edge in pixels (a
    sigmoid), which keeps sub-pixel motion visible. noise: std of the pixel noise, the irreducible part of the MSE.
    """

    radius: tuple[float, float] = (2.0, 5.0)
    max_discs: int = 2
    edge: float = 0.7
    noise: float = 0.01

    def __post_init__(self) -> None:
        low, high = self.radius
        if not 0 < low <= high:
            raise ValueError(f"radius must be (low, high) with 0 < low <= high, got {self.radius!r}")
        if self.max_discs not in (1, 2):
            raise ValueError(f"max_discs must be 1 or 2, got {self.max_discs!r}")
        if not self.edge > 0:
            raise ValueError(f"edge must be > 0 pixels, got {self.edge!r}")
        if not 0 <= self.noise < 0.5:
            raise ValueError(f"noise must be in [0, 0.5), got {self.noise!r}")


def make_moving_volume(shape: tuple[int, int, int], seed: int, spec: MovingDiscSpec = MovingDiscSpec()
                       ) -> tuple[np.ndarray, np.ndarray]:
    """One (D, H, W) volume in [0, 1] and its labels (0 = background, i = inside disc i; later discs on top).

    Each disc's centre runs on a straight line from a point drawn in the first slice to one drawn in the last,
    both inside the slice (a disc may be cut by the border), so a disc moves up to about one slice side over the
    volume: fast enough that copying the previous slice is clearly off.
    """
    if len(shape) != 3 or min(shape) < 2:
        raise ValueError(f"shape must be (D, H, W) with every side >= 2, got {shape!r}")
    depth, height, width = shape
    if 2 * spec.radius[1] >= min(height, width):
        raise ValueError(f"radius {spec.radius} does not fit in {height}x{width} slices; use a smaller radius or "
                         "larger slices")
    rng = np.random.default_rng(seed)
    z = np.linspace(0.0, 1.0, depth, dtype=np.float32)[:, None, None]  # (D, 1, 1) position along the line
    yy, xx = np.meshgrid(np.arange(height, dtype=np.float32), np.arange(width, dtype=np.float32), indexing="ij")
    background, foreground = rng.uniform(0.1, 0.3), rng.uniform(0.6, 0.9)
    image = np.full(shape, background, dtype=np.float32)
    labels = np.zeros(shape, dtype=np.int32)
    for disc in range(int(rng.integers(1, spec.max_discs + 1))):
        r0, r1 = rng.uniform(*spec.radius, size=2)
        (y0, x0), (y1, x1) = rng.uniform(0.0, [height - 1.0, width - 1.0], size=(2, 2))
        cy, cx, r = y0 + (y1 - y0) * z, x0 + (x1 - x0) * z, r0 + (r1 - r0) * z  # (D, 1, 1) each
        dist = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2)  # (D, H, W)
        inside = 1.0 / (1.0 + np.exp(-(r - dist) / spec.edge))  # soft disc, 0.5 on the circle
        grey = foreground if disc == 0 else rng.uniform(0.45, 0.6)
        image = image + (grey - image) * inside
        labels[dist <= r] = disc + 1
    image = image + rng.normal(0.0, spec.noise, size=shape).astype(np.float32)
    return np.clip(image, 0.0, 1.0).astype(np.float32), labels


def make_moving_volumes(n: int, shape: tuple[int, ...], seed: int, spec: MovingDiscSpec = MovingDiscSpec()
                        ) -> tuple[Tensor, Tensor]:
    """n volumes with seeds seed*100003 + i (as `data.make_volumes`). Returns (n, D, H, W) float32 and int64."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    pairs = [make_moving_volume(tuple(shape), seed * 100003 + i, spec) for i in range(n)]
    images = torch.from_numpy(np.stack([p[0] for p in pairs]))
    labels = torch.from_numpy(np.stack([p[1] for p in pairs]).astype(np.int64))
    return images, labels
