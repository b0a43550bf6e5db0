"""Seeded synthetic VQA benchmarks on which vision-token selection matters: `shapes`, `docs`, `video`.

    from mmreduce.eval.benchmarks import load_benchmark
    samples = load_benchmark("shapes", "test", n=200, seed=0)   # list[Sample]

Every sample is a pure function of (benchmark, split, seed, index); see `base.py`.
"""

from __future__ import annotations

from typing import Any, Callable

from .base import SPLITS, Sample, balanced_answer, sample_rng
from .docs import DocsConfig, make_docs_sample
from .shapes import ShapesConfig, make_shapes_sample
from .video import VideoConfig, make_video_sample

__all__ = [
    "BENCHMARKS",
    "SPLITS",
    "DocsConfig",
    "Sample",
    "ShapesConfig",
    "VideoConfig",
    "answer_vocabulary",
    "balanced_answer",
    "iter_benchmark",
    "list_benchmarks",
    "load_benchmark",
    "make_sample",
    "sample_rng",
]

#: name -> (config class, sample factory, question types, answers per type)
BENCHMARKS: dict[str, tuple[type, Callable[..., Sample]]] = {
    "shapes": (ShapesConfig, make_shapes_sample),
    "docs": (DocsConfig, make_docs_sample),
    "video": (VideoConfig, make_video_sample),
}


def list_benchmarks() -> list[str]:
    """Names accepted by `load_benchmark`."""
    return sorted(BENCHMARKS)


def _entry(name: str) -> tuple[type, Callable[..., Sample]]:
    if name not in BENCHMARKS:
        raise ValueError(f"benchmark must be one of {list_benchmarks()}, got {name!r}")
    return BENCHMARKS[name]


def make_sample(name: str, split: str, seed: int, index: int, **options: Any) -> Sample:
    """Sample `index` of benchmark `name`; `options` are fields of its config (e.g. `image_size=128`)."""
    config_cls, factory = _entry(name)
    return factory(split, seed, index, config_cls(**options))


def iter_benchmark(name: str, split: str, n: int, seed: int = 0, start: int = 0, **options: Any):
    """Yield samples `start .. start + n - 1` of a benchmark split without holding them all."""
    config_cls, factory = _entry(name)
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    if not isinstance(start, int) or isinstance(start, bool) or start < 0:
        raise ValueError(f"start must be a non-negative int, got {start!r}")
    cfg = config_cls(**options)
    for index in range(start, start + n):
        yield factory(split, seed, index, cfg)


def load_benchmark(name: str, split: str, n: int, seed: int = 0, start: int = 0, **options: Any) -> list[Sample]:
    """The first `n` samples (from index `start`) of `split` of benchmark `name`.

    Args:
    - name: "shapes", "docs" or "video".
    - split: "train", "calibration" or "test".
    - n: number of samples; any multiple of the answer-cycle length gives exactly balanced answers.
    - seed: selects an independent copy of every split.
    - options: fields of the benchmark's config dataclass (`ShapesConfig`, `DocsConfig`, `VideoConfig`).
    """
    return list(iter_benchmark(name, split, n, seed, start, **options))


def answer_vocabulary(name: str) -> list[str]:
    """Every answer word benchmark `name` can produce, sorted."""
    _entry(name)
    from . import docs, shapes, video

    module = {"shapes": shapes, "docs": docs, "video": video}[name]
    return sorted({a for answers in module.ANSWERS.values() for a in answers})
