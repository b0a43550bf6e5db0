"""The testbed's masked quality bar equals masking the same random choice in the 2-D attention mask."""

from __future__ import annotations

import pytest
import torch

from mmreduce.eval.benchmarks import load_benchmark
from mmreduce.eval.testbed.masked_drop import random_vision_mask
from mmreduce.eval.tiny_models import build_tiny, format_prompt


def test_random_vision_mask_matches_a_2d_mask_reference():
    model, processor = build_tiny("tiny-llava-shapes", seed=1)
    samples = load_benchmark("shapes", "test", 2, seed=0, image_size=128)
    inputs = processor(images=[s.image for s in samples], text=[format_prompt(s.question) for s in samples],
                       return_tensors="pt", padding=True)
    with torch.no_grad():
        plain = model(**inputs).logits[:, -1]
        with random_vision_mask(model, keep_ratio=1.0, layer=2):
            kept = model(**inputs).logits[:, -1]
        with random_vision_mask(model, keep_ratio=0.25, layer=0, seed=5):
            masked = model(**inputs).logits[:, -1]
        # Reference: from layer 0 on, masking keys equals zeroing them in the 2-D attention mask (for the last
        # token, which is never masked). Rebuild the same random choice independently.
        generator = torch.Generator().manual_seed(5)
        mask2d = inputs["attention_mask"].clone()
        for b in range(2):
            positions = (inputs["input_ids"][b] == model.config.image_token_id).nonzero().squeeze(1)
            order = torch.randperm(len(positions), generator=generator)
            mask2d[b, positions[order[64:]]] = 0  # keep ceil(0.25 * 256) = 64
        reference = model(**{**inputs, "attention_mask": mask2d}).logits[:, -1]
    assert torch.equal(plain, kept)
    assert torch.allclose(masked, reference, atol=1e-5)
    assert not torch.allclose(masked, plain, atol=1e-3)
    with pytest.raises(ValueError, match="keep_ratio"):
        with random_vision_mask(model, keep_ratio=0.0):
            pass
