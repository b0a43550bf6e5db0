"""The diagnostics behind docs/TRAINING.md: the attention report's masses, and the linear role probes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mmreduce.eval.benchmarks import load_benchmark
from mmreduce.eval.testbed.attention_report import attention_mass
from mmreduce.eval.testbed.role_probe import linear_probe_accuracy, role_report
from mmreduce.eval.tiny_models import build_tiny, format_prompt


@pytest.mark.slow  # the whole report, with eager attention weights
def test_attention_report_masses_add_up_and_objects_match_the_pixels():
    model, processor = build_tiny("tiny-llava-shapes", attn_implementation="eager")
    samples = load_benchmark("shapes", "test", 3, seed=4)
    report = attention_mass(model, processor, samples)
    assert len(report) == 8 and all(len(row["target"]) == 4 for row in report)
    for row in report:
        for h in range(4):
            assert row["image"][h] + row["text"][h] == pytest.approx(1.0, abs=1e-3)
            assert row["target"][h] <= row["objects"][h] + 1e-6 <= row["image"][h] + 2e-6
    # "objects" independently: the image tokens whose 8 px cell a shape's pixel box touches, by arithmetic.
    inputs = processor(images=[s.image for s in samples], text=[format_prompt(s.question) for s in samples],
                       return_tensors="pt", padding=True)
    with torch.no_grad():
        last = model(**inputs, output_attentions=True).attentions[3][:, :, -1]  # (B, H, T)
    expected = torch.zeros(4)
    for b, s in enumerate(samples):
        cells = np.zeros((16, 16), dtype=bool)
        for o in s.meta["objects"]:
            x0, y0, x1, y1 = o["cx"] - o["radius"], o["cy"] - o["radius"], o["cx"] + o["radius"], o["cy"] + o["radius"]
            cells[max(0, y0) // 8:min(127, y1) // 8 + 1, max(0, x0) // 8:min(127, x1) // 8 + 1] = True
        vision = (inputs["input_ids"][b] == model.config.image_token_id).nonzero().squeeze(1)
        expected += last[b][:, vision[torch.from_numpy(cells.reshape(-1))]].sum(-1)
    assert report[3]["objects"] == pytest.approx((expected / 3).tolist(), abs=1e-3)


@pytest.mark.slow  # loads the bundled checkpoint and fits two probes per layer
def test_role_probe_reads_a_planted_direction_not_noise_and_checks_its_model():
    """The probe behind docs/TRAINING.md's role figures: near 1 on a label planted in one feature, near chance on
    random labels; the report has one entry per decoder-layer input and counts same-axis errors among all errors."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 16, generator=g)
    planted = (x[:, 3] > 0).long()
    assert linear_probe_accuracy(x[:200], planted[:200], x[200:], planted[200:]) >= 0.97
    noise = torch.randint(0, 2, (400,), generator=g)
    assert 0.35 <= linear_probe_accuracy(x[:200], noise[:200], x[200:], noise[200:]) <= 0.65
    report = role_report("tiny-llava-shapes", samples=6, answer_samples=8)
    assert len(report["image_roles"]) == len(report["word_roles"]) == 8 + 1
    answers = report["position_answers"]
    assert answers["errors"] == round((1 - answers["accuracy"]) * 8)
    assert 0 <= answers["errors_same_axis_other_side"] <= answers["errors"]
    with pytest.raises(ValueError, match="LLaVA-1.5"):
        role_report("tiny-llava-next-docs", samples=1, answer_samples=1)
