"""Shared pieces of the synthetic benchmarks: the `Sample` record, split seeding and answer balancing.

Every sample is a pure function of `(benchmark, split, seed, index)`: its random generator is seeded from a
SHA-256 digest of those four values, so a sample never depends on how many others were drawn before it, the
splits are independent streams, and the bytes are the same on every machine.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

__all__ = ["SPLITS", "Sample", "balanced_answer", "sample_rng"]

#: The three splits every benchmark offers; models train on `train`, schedules are searched on `calibration`
#: and accuracies are reported on `test`.
SPLITS = ("train", "calibration", "test")


@dataclass
class Sample:
    """One closed-vocabulary VQA item.

    Fields:
    - images: the image(s) to show the model; one for `shapes`/`docs`, a few sampled frames for `video`.
    - question: the question text (lower case words separated by spaces, ending in " ?").
    - answer: the correct answer, one word of `choices`.
    - choices: every answer this question type can have (the closed vocabulary of the type).
    - meta: generator facts: `benchmark`, `split`, `seed`, `index`, `qtype`, the objects drawn and
      `target_boxes` (pixel boxes `(x0, y0, x1, y1)` of the objects the answer depends on).
    - video: path of the mp4 clip (`video` benchmark only), else None.
    """

    images: list[Image.Image]
    question: str
    answer: str
    choices: tuple[str, ...]
    meta: dict[str, Any] = field(default_factory=dict)
    video: str | None = None

    def __post_init__(self) -> None:
        if not self.images:
            raise ValueError("Sample.images must hold at least one image, got an empty list")
        if self.answer not in self.choices:
            raise ValueError(f"Sample.answer={self.answer!r} is not one of choices={self.choices!r}")

    @property
    def image(self) -> Image.Image:
        """The first (for most benchmarks the only) image."""
        return self.images[0]


def sample_rng(benchmark: str, split: str, seed: int, index: int) -> np.random.Generator:
    """A generator seeded only by the sample's identity (see the module docstring)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    if not isinstance(index, int) or isinstance(index, bool) or index < 0:
        raise ValueError(f"index must be a non-negative int, got {index!r}")
    digest = hashlib.sha256(f"{benchmark}/{split}/{seed}/{index}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:16], "little"))


def balanced_answer(index: int, qtypes: tuple[str, ...], answers: dict[str, tuple[str, ...]]) -> tuple[str, str]:
    """Question type and answer of sample `index`, cycling so that both are exactly balanced.

    The type cycles fastest; within a type the answers cycle in order, so any run of
    `len(qtypes) * len(answers[t])` consecutive indices holds every answer of type `t` equally often.
    """
    qtype = qtypes[index % len(qtypes)]
    choices = answers[qtype]
    return qtype, choices[(index // len(qtypes)) % len(choices)]
