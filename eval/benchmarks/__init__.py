"""Seeded synthetic VQA benchmarks on which vision-token selection matters: `shapes`, `docs`, `video`; and your own
data as a JSON-lines dataset file.

    from mmreduce.eval.benchmarks import load_benchmark
    samples = load_benchmark("shapes", "test", n=200, seed=0)   # list[Sample]
    mine = load_benchmark("my-data.jsonl", "test", n=100)        # a name ending in .jsonl: see `user.py`

Every synthetic sample is a pure function of (benchmark, split, seed, index); see `base.py`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Iterator

from .base import SPLITS, Sample, balanced_answer, sample_rng
from .docs import DocsConfig, make_docs_sample
from .shapes import ShapesConfig, make_shapes_sample
from .user import is_dataset_file, iter_dataset_file
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
    "is_dataset_file",
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
    """The synthetic benchmarks' names. `load_benchmark` also takes the path of a dataset file ending in `.jsonl`."""
    return sorted(BENCHMARKS)


def _entry(name: str) -> tuple[type, Callable[..., Sample]]:
    if name not in BENCHMARKS:
        hint = ""
        if isinstance(name, (str, os.PathLike)) and Path(name).is_file():
            hint = " (a dataset file's name must end in .jsonl: one JSON object per line)"
        raise ValueError(f"benchmark must be one of {list_benchmarks()} or a dataset file ending in .jsonl, "
                         f"got {os.fspath(name) if isinstance(name, os.PathLike) else name!r}{hint}")
    return BENCHMARKS[name]


def make_sample(name: str, split: str, seed: int, index: int, **options: Any) -> Sample:
    """Sample `index` of benchmark `name`; `options` are fields of its config (e.g. `image_size=128`)."""
    config_cls, factory = _entry(name)
    return factory(split, seed, index, config_cls(**options))


def iter_benchmark(name: str | os.PathLike, split: str, n: int, seed: int = 0, start: int = 0,
                   **options: Any) -> Iterator[Sample]:
    """Samples `start .. start + n - 1` of a benchmark split, built one at a time.

    The arguments are checked (and a dataset file read and checked) when this is called, before the first sample.
    """
    if is_dataset_file(name):
        return iter_dataset_file(name, split, n, start=start, **options)
    config_cls, factory = _entry(name)
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    if not isinstance(start, int) or isinstance(start, bool) or start < 0:
        raise ValueError(f"start must be a non-negative int, got {start!r}")
    cfg = config_cls(**options)
    return (factory(split, seed, index, cfg) for index in range(start, start + n))


def load_benchmark(name: str | os.PathLike, split: str, n: int, seed: int = 0, start: int = 0,
                   **options: Any) -> list[Sample]:
    """The first `n` samples (from index `start`) of `split` of benchmark `name`.

    Args:
    - name: "shapes", "docs" or "video"; or the path of a dataset file ending in `.jsonl` (your own images or
      videos, questions and answers; format and checks in `user.py`).
    - split: "train", "calibration" or "test". A dataset file's lines may name their split; a line without one
      belongs to every split.
    - n: number of samples; any multiple of the answer-cycle length gives exactly balanced answers. A dataset
      file with fewer than `n` lines of the split (after `start`) is an error that says how many it has.
    - seed: selects an independent copy of every split; ignored for a dataset file (its order is the file's).
    - start: index of the first sample (for a dataset file: lines of the split to skip).
    - options: fields of the benchmark's config dataclass (`ShapesConfig`, `DocsConfig`, `VideoConfig`); a
      dataset file takes none.
    """
    return list(iter_benchmark(name, split, n, seed, start, **options))


def answer_vocabulary(name: str) -> list[str]:
    """Every answer word benchmark `name` can produce, sorted."""
    _entry(name)
    from . import docs, shapes, video

    module = {"shapes": shapes, "docs": docs, "video": video}[name]
    return sorted({a for answers in module.ANSWERS.values() for a in answers})
