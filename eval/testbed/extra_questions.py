"""Extra training questions read off a sample's scene (training only: more supervision per image forward).

The vision tokens are the expensive part of a training step; asking several questions about one image in a
multi-turn prompt costs a few text tokens each. Every extra question follows the benchmark's own definitions
(uniqueness for "the", the position rule of `shapes._position_regions`), so it never teaches a different task.
"""

from __future__ import annotations

import numpy as np

from ..benchmarks import Sample
from ..benchmarks.draw import COLORS, SHAPES

__all__ = ["extra_questions"]

_COUNT = {1: "one", 2: "two", 3: "three"}


def _shapes_pool(sample: Sample, rng: np.random.Generator) -> list[tuple[str, str]]:
    objs = sample.meta["objects"]
    size = sample.image.size[0]
    pool = []
    for shape in SHAPES:
        hits = [o for o in objs if o["shape"] == shape]
        if len(hits) == 1:
            pool.append((f"what color is the {shape} ?", hits[0]["color"]))
    for color in COLORS:
        hits = [o for o in objs if o["color"] == color]
        if len(hits) == 1:
            pool.append((f"what shape is the {color} object ?", hits[0]["shape"]))
        if 1 <= len(hits) <= 3:
            pool.append((f"how many {color} objects are there ?", _COUNT[len(hits)]))
    present = {(o["color"], o["shape"]) for o in objs}
    for _ in range(2):
        if rng.random() < 0.5 and present:
            color, shape = sorted(present)[int(rng.integers(len(present)))]
        else:
            color, shape = list(COLORS)[int(rng.integers(len(COLORS)))], SHAPES[int(rng.integers(len(SHAPES)))]
        pool.append((f"is there a {color} {shape} ?", "yes" if (color, shape) in present else "no"))
    unique = [o for o in objs if sum(p["color"] == o["color"] for p in objs) == 1]
    for a in unique:
        for b in unique:
            if a is b:
                continue
            dx, dy = a["cx"] - b["cx"], a["cy"] - b["cy"]
            # Same rule as the test questions: a third of the image apart on one axis, under a quarter on the other.
            if abs(dx) >= size / 3 and abs(dy) < size / 4:
                answer = "left" if dx < 0 else "right"
            elif abs(dy) >= size / 3 and abs(dx) < size / 4:
                answer = "above" if dy < 0 else "below"
            else:
                continue
            pool.append((f"where is the {a['color']} object relative to the {b['color']} object ?", answer))
    return pool


def _docs_pool(sample: Sample) -> list[tuple[str, str]]:
    pool = []
    for f in sample.meta["fields"]:
        pool.append((f"what digit is in the {f['color']} box ?", f["digit"]))
        pool.append((f"what color is the box with the {f['digit']} ?", f["color"]))
    return pool


def extra_questions(sample: Sample, k: int, seed: int) -> list[tuple[str, str]]:
    """Up to `k` (question, answer) pairs about `sample`'s scene, other than its own question; deterministic."""
    meta = sample.meta
    rng = np.random.default_rng([seed, meta["index"], 7])
    pool = _shapes_pool(sample, rng) if meta["benchmark"] == "shapes" else _docs_pool(sample)
    pool = [qa for qa in dict.fromkeys(pool) if qa[0] != sample.question]
    order = rng.permutation(len(pool))[:k]
    return [pool[i] for i in order]
