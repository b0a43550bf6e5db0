"""train.config: TrainConfig rejects inconsistent settings, naming the field at fault."""

from __future__ import annotations

import pytest

from mmreduce.eval.testbed.train import TrainConfig


def test_config_validation():
    with pytest.raises(ValueError, match="model"):
        TrainConfig(model="nope")
    with pytest.raises(ValueError, match="steps"):
        TrainConfig(steps=0)
    with pytest.raises(ValueError, match="lr"):
        TrainConfig(lr=-1.0)


def test_curriculum_and_loss_options_are_validated():
    for bad, message in [(dict(curriculum=((5, 1),)), "curriculum"), (dict(value_aux_weight=1.0), "grounding_layers"),
                         (dict(deep_layers=(0,)), "deep_layers"), (dict(match_layer=-1), "match_layer")]:
        with pytest.raises(ValueError, match=message):
            TrainConfig(**bad)


def test_question_first_options_are_validated():
    for bad, message in [(dict(question_first=True), "extra_questions=0"),
                         (dict(relevance_layer=3, extra_questions=0), "question_first"),
                         (dict(question_first=True, extra_questions=0, copy_layer=-1), "copy_layer")]:
        with pytest.raises(ValueError, match=message):
            TrainConfig(**bad)
    with pytest.raises(ValueError, match="copy_roles needs copy_layer"):
        TrainConfig(copy_roles=True)
