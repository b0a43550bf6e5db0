"""grounding: which image tokens lie under a box (both architectures), and the grounding probe's losses against
the model's own attention weights."""

from __future__ import annotations

import pytest
import torch

from mmreduce.eval.benchmarks import Sample, load_benchmark
from mmreduce.eval.testbed.grounding import GroundingProbe, target_positions
from mmreduce.eval.testbed.train.targets import other_object_positions
from mmreduce.eval.tiny_models import build_tiny, format_prompt


def test_grounding_targets_are_the_image_tokens_under_the_boxes():
    from PIL import Image

    # LLaVA-1.5, 128 px, 8 px patches: box x 17..23, y 9..15 lies in the single cell (row 1, col 2).
    model, _ = build_tiny("tiny-llava-shapes")
    sample = Sample(images=[Image.new("RGB", (128, 128))], question="q", answer="a", choices=("a",),
                    meta=dict(target_boxes=[(17, 9, 23, 15)]))
    vision = torch.arange(5, 5 + 256)  # image tokens after 5 text tokens
    assert target_positions(sample, vision, model.config).tolist() == [5 + 1 * 16 + 2]
    # LLaVA-NeXT, 128 px page, 64 px crops, 16 px patches: base map 4x4 of 32 px cells, then 8 rows of 8 + newline.
    model, _ = build_tiny("tiny-llava-next-docs")
    sample.meta["target_boxes"] = [(40, 70, 50, 80)]  # cells: base (2, 1); full map rows 4..5, cols 2..3
    vision = torch.arange(3, 3 + 16 + 8 * 9)
    expected = [2 * 4 + 1] + [16 + r * 9 + c for r in (4, 5) for c in (2, 3)]
    assert target_positions(sample, vision, model.config).tolist() == [3 + i for i in expected]


def test_grounding_probe_losses_match_the_models_own_attention_weights():
    """Mass and contrast terms recomputed from eager attention weights (head 0 only, `heads=1`)."""
    model, processor = build_tiny("tiny-llava-shapes", attn_implementation="eager")
    sample = next(s for s in load_benchmark("shapes", "test", 20, seed=5) if len(s.meta["objects"]) >= 3)
    inputs = processor(images=[sample.image], text=[format_prompt(sample.question)], return_tensors="pt")
    ids = inputs["input_ids"]
    vision = (ids[0] == model.config.image_token_id).nonzero().squeeze(1)
    targets = target_positions(sample, vision, model.config)
    others = other_object_positions(sample, vision, model.config, targets)
    assert targets.numel() and others.numel() and not set(targets.tolist()) & set(others.tolist())
    probe = GroundingProbe(model, (2,), heads=1)
    probe.query, probe.key_valid = torch.tensor([ids.shape[1] - 1]), inputs["attention_mask"]
    probe.targets, probe.negatives = [targets], [others]
    with torch.no_grad():
        weights = model(**inputs, output_attentions=True).attentions[2][0, 0, -1]  # (T,) head 0, last query
    mass, contrast = probe._losses
    assert float(mass) == pytest.approx(-float(weights[targets].sum().log()), rel=1e-4)
    gap = float(weights[others].sum().log() - weights[targets].sum().log())
    assert float(contrast) == pytest.approx(float(torch.nn.functional.softplus(torch.tensor(gap + 1.0))), rel=1e-4)
    probe.remove()
