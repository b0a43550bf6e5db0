"""train_tiny: patch targets against a hand-made reference, the CLI hook, and a one-step run that saves."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch

from mmreduce.eval.train_tiny import TrainConfig, add_subparser, patch_labels, train


def test_patch_labels_take_the_majority_id_above_a_pixel_floor():
    label_map = np.zeros((4, 4), dtype=np.int64)
    label_map[0, 0:2] = 3  # top-left cell: two pixels of id 3
    label_map[2:4, 2:4] = 5  # bottom-right cell: four pixels of id 5
    label_map[3, 3] = 7  # ... one of them overwritten by id 7 (minority)
    expected = np.array([[3, 0], [0, 5]])
    assert (patch_labels(label_map, 2, min_pixels=2) == expected).all()
    assert (patch_labels(label_map, 2, min_pixels=3) == np.array([[0, 0], [0, 5]])).all()


def test_cli_hook_parses_and_sets_func():
    parser = argparse.ArgumentParser()
    add_subparser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["train-tiny", "tiny-llava-shapes", "--steps", "3", "--seed", "2"])
    assert args.func.__name__ == "_run" and args.steps == 3 and args.seed == 2
    with pytest.raises(SystemExit):
        parser.parse_args(["train-tiny", "tiny-nope"])


def test_config_validation():
    with pytest.raises(ValueError, match="model"):
        TrainConfig(model="nope")
    with pytest.raises(ValueError, match="steps"):
        TrainConfig(steps=0)
    with pytest.raises(ValueError, match="lr"):
        TrainConfig(lr=-1.0)


def test_one_step_run_saves_a_loadable_checkpoint_and_a_log(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "run"
    summary = train(TrainConfig(model="tiny-llava-next-docs", steps=1, batch_size=2, eval_every=0, eval_samples=2,
                                out=str(out)))
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert json.loads((out / "train_config.json").read_text())["config"]["steps"] == 1
    assert summary["history"][-1]["step"] == 1
    assert "step 0 loss" in (tmp_path / "run.train.log").read_text()
    from mmreduce.eval.tiny_models import load_tiny

    model, processor = load_tiny(out)
    assert model.config.model_type == "llava_next"


def test_grounding_targets_are_the_image_tokens_under_the_boxes():
    from mmreduce.eval._grounding import target_positions
    from mmreduce.eval.benchmarks import Sample
    from mmreduce.eval.tiny_models import build_tiny
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
