"""train.loop: short runs that save loadable checkpoints and logs, the object-count curriculum, and the prompt
order a checkpoint ships."""

from __future__ import annotations

import json

import pytest

from mmreduce.eval.testbed.train import TrainConfig, train
from mmreduce.eval.testbed.train.loop import _crowding, _question_first
from mmreduce.eval.tiny_models import TINY_MODELS, load_tiny, prompt_for


def test_one_step_run_saves_a_loadable_checkpoint_and_a_log(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "run"
    summary = train(TrainConfig(model="tiny-llava-next-docs", steps=1, batch_size=2, eval_every=0, eval_samples=2,
                                out=str(out)))
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert json.loads((out / "train_config.json").read_text())["config"]["steps"] == 1
    assert summary["history"][-1]["step"] == 1
    assert "step 0 loss" in (tmp_path / "run.train.log").read_text()
    model, processor = load_tiny(out)
    assert model.config.model_type == "llava_next"


def test_curriculum_crowds_the_scenes_step_by_step():
    cfg = TrainConfig(curriculum=((0, 1), (10, 4)))
    assert _crowding(cfg, TINY_MODELS["tiny-llava-shapes"], 9) == {"min_objects": 1, "max_objects": 1}
    assert _crowding(cfg, TINY_MODELS["tiny-llava-shapes"], 10)["max_objects"] == 4
    assert _crowding(cfg, TINY_MODELS["tiny-llava-next-docs"], 0) == {"min_fields": 2, "max_fields": 2}
    assert _crowding(TrainConfig(), TINY_MODELS["tiny-llava-shapes"], 0) == {}


def test_question_first_prompts_come_from_the_checkpoints_own_template(tmp_path):
    from dataclasses import replace

    from transformers import AutoProcessor

    from mmreduce.eval.tiny_models import build_processor, format_prompt

    question = "what color is the circle ?"
    image_first = build_processor(TINY_MODELS["tiny-llava-shapes"])
    question_first = build_processor(replace(TINY_MODELS["tiny-llava-shapes"], question_first=True))
    assert prompt_for(image_first, question, 2) == format_prompt(question, 2) == \
        "USER: <image>\n<image>\nwhat color is the circle ? ASSISTANT:"
    assert prompt_for(question_first, question) == format_prompt(question, question_first=True) == \
        "USER: what color is the circle ?\n<image>\n ASSISTANT:"
    ids = question_first.tokenizer(prompt_for(question_first, question))["input_ids"]
    words = question_first.tokenizer.convert_ids_to_tokens(ids)
    assert words.index("circle") < words.index("<image>") < words.index("ASSISTANT")
    assert not _question_first(image_first) and _question_first(question_first)
    question_first.save_pretrained(tmp_path)  # the order travels with the checkpoint
    assert _question_first(AutoProcessor.from_pretrained(tmp_path, local_files_only=True))


def test_question_first_run_with_a_vision_warmup_ships_its_prompt_order(tmp_path, monkeypatch):
    """The new recipe end to end for two steps: image-only steps first (logged), then language steps with the
    relevance and copy heads; the checkpoint answers prompts in its own (question-first) order."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "qf"
    train(TrainConfig(model="tiny-llava-shapes", steps=1, batch_size=2, eval_every=0, eval_samples=2, out=str(out),
                      question_first=True, extra_questions=0, relevance_layer=3, copy_layer=2, grounding_layers=(3,),
                      vision_steps=2, vision_batch_size=2))
    log = (tmp_path / "qf.train.log").read_text()
    assert "vision step 1 patch_loss" in log and "step 0 loss" in log and "object_shape_acc" in log
    _, processor = load_tiny(out)
    assert prompt_for(processor, "what color is the circle ?").startswith("USER: what color is the circle ?")
    with pytest.raises(ValueError, match="prompt order"):
        train(TrainConfig(model="tiny-llava-shapes", steps=1, batch_size=2, eval_every=0, eval_samples=2,
                          init_from=str(out), out=str(tmp_path / "other")))
