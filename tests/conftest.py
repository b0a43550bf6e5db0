"""Fixtures shared by several test files: tiny random-weight LLaVA models and a left-padded batch for them.

The builders themselves live in tests/support/vlm_factory.py (importable as `tests.support.vlm_factory` for tests
that need another depth or attention implementation). Tests marked `slow` take more than a few seconds each;
`pytest -m "not slow"` is the quick loop, `make test` runs everything.
"""

from __future__ import annotations

import pytest

from tests.support.vlm_factory import llava_batch, tiny_llava

LAYERS = 6  # decoder layers of the shared tiny models


@pytest.fixture
def fresh_llava():
    """A tiny LLaVA-1.5 (sdpa, 6 layers) of its own, for a test that dispatches, re-configures or wraps it and must
    not hand that state to the next test."""
    return tiny_llava("sdpa", layers=LAYERS)


@pytest.fixture(scope="module")
def module_llava():
    """One tiny LLaVA-1.5 (sdpa, 6 layers) per test module, for tests that wrap it and unwrap it again."""
    return tiny_llava("sdpa", layers=LAYERS)


@pytest.fixture
def llava_inputs():
    """A left-padded batch of three prompts (64 vision tokens each) for the tiny LLaVA-1.5: input_ids (3, T),
    attention_mask (3, T), pixel_values (3, 3, 32, 32)."""
    return llava_batch()
