"""Fixtures shared by the eval tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def untrained_tiny_checkpoint(tmp_path_factory) -> str:
    """A saved random-init tiny-llava-shapes (seed 0) directory, built once per run; tests only read it."""
    from mmreduce.eval.tiny_models import build_tiny, save_tiny

    model, processor = build_tiny("tiny-llava-shapes", seed=0)
    return str(save_tiny(model, processor, tmp_path_factory.mktemp("tiny-checkpoint") / "untrained"))
