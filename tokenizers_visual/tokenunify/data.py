"""EM-like volumes: Voronoi cells with dark membranes, blur and noise, with their cell labels.

A stand-in for the electron-microscopy crops TokenUnify pretrains on. Cells are the Voronoi regions of random
seeds (z distances down-weighted so that cells run through sections, like neurites); membranes are the
voxels next to a different cell in-plane or across sections; cytoplasm gets a per-cell grey level and
texture; then Gaussian blur and pixel noise. Labels are the Voronoi cell ids (membrane voxels belong to
their cell), from which the segmentation affinities are computed.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage
from torch import Tensor

__all__ = ["affinities", "make_volume", "make_volumes"]


def make_volume(shape: tuple[int, ...], seed: int, cell_size: float = 10.0, z_stretch: float = 0.5
                ) -> tuple[np.ndarray, np.ndarray]:
    """One volume (3-D shape (D, H, W)) or image (2-D shape (H, W)).

    Args:
        shape: spatial shape.
        seed: RNG seed.
        cell_size: typical cell diameter in pixels (sets the number of seeds).
        z_stretch: weight of z distances (3-D only); below 1 makes cells run through several sections, like neurites.

    Returns:
        image: float32 in [0, 1] of `shape`; labels: int32 cell ids >= 1 of `shape`.
    """
    if len(shape) not in (2, 3) or min(shape) < 1:
        raise ValueError(f"shape must be 2-D or 3-D with positive sides, got {shape!r}")
    if not cell_size > 1:
        raise ValueError(f"cell_size must be > 1, got {cell_size!r}")
    rng = np.random.default_rng(seed)
    in_plane = shape[-2] * shape[-1]
    n_cells = max(2, int(round(in_plane / (cell_size**2) * 1.3)))
    grid = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij"), -1)  # (*shape, nd)
    # Seeds may sit a little outside the box so that border cells look cut, as in a real crop.
    lo, hi = -0.1 * np.array(shape), 1.1 * np.array(shape)
    seeds = rng.uniform(lo, hi, size=(n_cells, len(shape))).astype(np.float32)  # (n, nd)
    scale = np.ones(len(shape), dtype=np.float32)
    if len(shape) == 3:
        scale[0] = z_stretch
    d2 = (((grid[..., None, :] - seeds) * scale) ** 2).sum(-1)  # (*shape, n)
    labels = d2.argmin(-1).astype(np.int32) + 1
    # Membrane: a voxel whose neighbour along any axis belongs to another cell.
    membrane = np.zeros(shape, dtype=bool)
    for axis in range(len(shape)):
        diff = np.diff(labels, axis=axis) != 0
        pad_lo = [(0, 0)] * len(shape)
        pad_hi = [(0, 0)] * len(shape)
        pad_lo[axis], pad_hi[axis] = (1, 0), (0, 1)
        membrane |= np.pad(diff, pad_lo) | np.pad(diff, pad_hi)
    grey = rng.uniform(0.55, 0.85, size=n_cells + 1).astype(np.float32)
    image = grey[labels] + rng.normal(0, 0.05, size=shape).astype(np.float32)
    image = ndimage.gaussian_filter(image, sigma=1.0)  # organelle-like texture inside cells
    image[membrane] = rng.uniform(0.1, 0.2)
    sigma = (0.3, 0.8, 0.8)[-len(shape):]
    image = ndimage.gaussian_filter(image, sigma=sigma) + rng.normal(0, 0.04, size=shape).astype(np.float32)
    lo_v, hi_v = image.min(), image.max()
    image = (image - lo_v) / max(hi_v - lo_v, 1e-6)  # min-max to [0, 1], as TokenUnify's loader does
    return image.astype(np.float32), labels


def make_volumes(n: int, shape: tuple[int, ...], seed: int) -> tuple[Tensor, Tensor]:
    """n volumes with seeds seed*100003 + i. Returns images (n, *shape) float32 and labels (n, *shape) int64."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    pairs = [make_volume(shape, seed * 100003 + i) for i in range(n)]
    images = torch.from_numpy(np.stack([p[0] for p in pairs]))
    labels = torch.from_numpy(np.stack([p[1] for p in pairs]).astype(np.int64))
    return images, labels


def affinities(labels: Tensor, ndim: int) -> Tensor:
    """Nearest-neighbour affinities of the last `ndim` axes: (..., *S) labels -> (..., ndim, *S) float32.

    Channel c at voxel v is 1 when v and its predecessor along spatial axis c (v - e_c) carry the same label,
    else 0; the first slice along each axis has no predecessor and gets 0.
    """
    if ndim not in (2, 3) or labels.dim() < ndim:
        raise ValueError(f"ndim must be 2 or 3 and labels must have >= ndim axes; got ndim={ndim}, "
                         f"labels of shape {tuple(labels.shape)}")
    out = []
    for c in range(ndim):
        axis = labels.dim() - ndim + c
        n = labels.shape[axis]
        same = labels.narrow(axis, 1, n - 1) == labels.narrow(axis, 0, n - 1)  # v vs v - e_c
        pad = torch.zeros_like(labels.narrow(axis, 0, 1), dtype=torch.bool)
        out.append(torch.cat([pad, same], dim=axis))
    return torch.stack(out, dim=labels.dim() - ndim).float()
