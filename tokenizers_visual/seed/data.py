"""Generated image-caption pairs for training SEED here: two coloured shapes on a noisy background.

Captions read "a small red circle left of a large blue square". Everything comes from one integer seed, so a
split is reproducible: ``make_pairs(n, seed)`` returns the same pixels and captions on every machine. This
generator belongs to the tokenizers and does not depend on the eval benchmarks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

__all__ = ["COLOURS", "RELATIONS", "SHAPES", "SIZES", "CaptionVocab", "ShapeSpec", "draw_shape", "make_pairs"]

COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.9, 0.1, 0.1),
    "green": (0.1, 0.75, 0.15),
    "blue": (0.15, 0.25, 0.95),
    "yellow": (0.95, 0.85, 0.1),
    "purple": (0.6, 0.15, 0.75),
    "cyan": (0.1, 0.8, 0.85),
}
SHAPES = ("circle", "square", "triangle", "cross")
SIZES = {"small": 4.0, "large": 7.0}  # half-extent in pixels at 32 px; scaled with the image size
RELATIONS = ("left of", "right of", "above", "below")


@dataclass(frozen=True)
class ShapeSpec:
    """One object: shape name, colour name, size name and centre (row, col) in pixels."""

    shape: str
    colour: str
    size: str
    centre: tuple[float, float]

    def phrase(self) -> str:
        return f"a {self.size} {self.colour} {self.shape}"


def draw_shape(canvas: np.ndarray, spec: ShapeSpec, scale: float) -> None:
    """Paint spec onto canvas in place. canvas: (H, W, 3) float32 in [0, 1]."""
    h, w, _ = canvas.shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5  # pixel centres
    cy, cx = spec.centre
    r = SIZES[spec.size] * scale
    dy, dx = yy - cy, xx - cx
    if spec.shape == "circle":
        mask = dy**2 + dx**2 <= r**2
    elif spec.shape == "square":
        mask = (np.abs(dy) <= r * 0.85) & (np.abs(dx) <= r * 0.85)
    elif spec.shape == "triangle":
        # Upward triangle: apex at the top, base at the bottom; |dx| shrinks linearly towards the apex.
        mask = (dy >= -r) & (dy <= r) & (np.abs(dx) <= (dy + r) / 2.0)
    elif spec.shape == "cross":
        arm = max(r * 0.3, 1.0)
        mask = ((np.abs(dy) <= arm) & (np.abs(dx) <= r)) | ((np.abs(dx) <= arm) & (np.abs(dy) <= r))
    else:
        raise ValueError(f"unknown shape {spec.shape!r}; expected one of {SHAPES}")
    canvas[mask] = COLOURS[spec.colour]


def _relation(a: ShapeSpec, b: ShapeSpec) -> str:
    """Relation of a to b along the axis where they are further apart (rows grow downwards)."""
    dy, dx = a.centre[0] - b.centre[0], a.centre[1] - b.centre[1]
    if abs(dx) >= abs(dy):
        return "left of" if dx < 0 else "right of"
    return "above" if dy < 0 else "below"


def _sample_pair(rng: np.random.Generator, size: int) -> tuple[ShapeSpec, ShapeSpec]:
    scale = size / 32.0
    while True:
        specs = []
        for _ in range(2):
            sz = str(rng.choice(list(SIZES)))
            r = SIZES[sz] * scale
            centre = (float(rng.uniform(r + 1, size - r - 1)), float(rng.uniform(r + 1, size - r - 1)))
            specs.append(ShapeSpec(str(rng.choice(SHAPES)), str(rng.choice(list(COLOURS))), sz, centre))
        a, b = specs
        gap = np.hypot(a.centre[0] - b.centre[0], a.centre[1] - b.centre[1])
        # Keep the two objects apart (no overlap) and of different colours, so the caption is unambiguous.
        if gap > (SIZES[a.size] + SIZES[b.size]) * scale + 1 and a.colour != b.colour:
            return a, b


def make_pairs(n: int, seed: int, size: int = 32) -> tuple[Tensor, list[str]]:
    """Generate n image-caption pairs.

    Args:
        n: number of pairs.
        seed: RNG seed; the same (n, seed, size) always gives the same data.
        size: image side in pixels (>= 24).

    Returns:
        pixels: (n, 3, size, size) float32 in [0, 1]; captions: list of n strings.
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    if not isinstance(size, int) or size < 24:
        raise ValueError(f"size must be an int >= 24, got {size!r}")
    rng = np.random.default_rng(seed)
    images = np.empty((n, size, size, 3), dtype=np.float32)
    captions = []
    for i in range(n):
        # Background: a random dim grey level plus pixel noise, so colour alone does not find the objects.
        bg = rng.uniform(0.25, 0.5)
        images[i] = bg + rng.normal(0.0, 0.04, size=(size, size, 3))
        a, b = _sample_pair(rng, size)
        draw_shape(images[i], a, size / 32.0)
        draw_shape(images[i], b, size / 32.0)
        captions.append(f"{a.phrase()} {_relation(a, b)} {b.phrase()}")
    # (n, H, W, 3) -> (n, 3, H, W)
    pixels = torch.from_numpy(np.clip(images, 0.0, 1.0)).permute(0, 3, 1, 2).contiguous()
    return pixels, captions


class CaptionVocab:
    """Word-level tokenizer over the closed caption vocabulary: id 0 = pad, 1 = [CLS] (prepended)."""

    PAD, CLS = 0, 1

    def __init__(self) -> None:
        words = ["a", *SIZES, *COLOURS, *SHAPES, "left", "right", "of", "above", "below"]
        self.itos = ["<pad>", "<cls>", *words]
        self.stoi = {w: i for i, w in enumerate(self.itos)}

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, captions: list[str], length: int = 12) -> Tensor:
        """captions -> (B, length) int64: [CLS] + word ids, right-padded with 0."""
        out = torch.zeros(len(captions), length, dtype=torch.long)
        for i, cap in enumerate(captions):
            words = cap.split()
            unknown = [w for w in words if w not in self.stoi]
            if unknown:
                raise ValueError(f"caption {cap!r} has words outside the vocabulary: {unknown}")
            if len(words) + 1 > length:
                raise ValueError(f"caption {cap!r} needs {len(words) + 1} tokens, more than length={length}")
            out[i, 0] = self.CLS
            out[i, 1 : len(words) + 1] = torch.tensor([self.stoi[w] for w in words])
        return out
