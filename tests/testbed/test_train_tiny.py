"""train_tiny: patch targets against a hand-made reference, the CLI hook, and a one-step run that saves."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch

from mmreduce.eval.testbed.train_tiny import TrainConfig, add_subparser, patch_labels, train


def test_patch_labels_take_the_majority_id_above_a_pixel_floor():
    label_map = np.zeros((4, 4), dtype=np.int64)
    label_map[0, 0:2] = 3  # top-left cell: two pixels of id 3
    label_map[2:4, 2:4] = 5  # bottom-right cell: four pixels of id 5
    label_map[3, 3] = 7  # ... one of them overwritten by id 7 (minority)
    expected = np.array([[3, 0], [0, 5]])
    assert (patch_labels(label_map, 2, min_pixels=2) == expected).all()
    assert (patch_labels(label_map, 2, min_pixels=3) == np.array([[0, 0], [0, 5]])).all()


def test_patch_labels_match_a_per_cell_count_on_random_maps():
    """The vectorised count against a plain per-cell loop (np.unique), ties going to the smallest id."""

    def per_cell(label_map, patch, min_pixels):
        h, w = label_map.shape
        out = np.zeros((h // patch, w // patch), dtype=np.int64)
        for i in range(h // patch):
            for j in range(w // patch):
                cell = label_map[i * patch:(i + 1) * patch, j * patch:(j + 1) * patch].ravel()
                ids, counts = np.unique(cell[cell > 0], return_counts=True)
                if len(ids) and counts.max() >= min_pixels:
                    out[i, j] = ids[counts.argmax()]
        return out

    rng = np.random.default_rng(0)
    for trial in range(40):
        blocks = np.kron(rng.integers(0, 110, (4, 4)), np.ones((4, 4), dtype=np.int64))
        label_map = blocks * (rng.random((16, 16)) < 0.7) if trial % 2 else rng.integers(0, 5, (16, 16))
        for min_pixels in (1, 3, 6):
            assert (patch_labels(label_map, 4, min_pixels) == per_cell(label_map, 4, min_pixels)).all()
    assert (patch_labels(np.zeros((8, 8), dtype=np.int64), 4, 1) == 0).all()


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
    from mmreduce.eval.testbed.grounding import target_positions
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


def test_sequence_targets_put_each_field_where_the_grounding_boxes_are():
    """Two independent routes to 'which image tokens hold the asked field': the drawn label map in prompt order,
    and the target boxes through `target_positions`; the full-resolution token of the field must agree."""
    from mmreduce.eval.testbed.grounding import target_positions
    from mmreduce.eval.benchmarks import load_benchmark
    from mmreduce.eval.benchmarks.draw import COLORS
    from mmreduce.eval.tiny_models import TINY_MODELS, build_tiny
    from mmreduce.eval.testbed.train_tiny import _sequence_targets

    model, _ = build_tiny("tiny-llava-next-docs")
    recipe = TINY_MODELS["tiny-llava-next-docs"]
    for sample in load_benchmark("docs", "test", 12, seed=3):
        labels = _sequence_targets([sample], recipe)[0]  # (n_vision,) in prompt order
        assert labels.numel() == 16 + 8 * 9  # base 4x4, then 8 rows of 8 tokens + a newline
        target = target_positions(sample, torch.arange(labels.numel()), model.config)
        full_res = [int(t) for t in target if t >= 16]  # the base view is down-scaled and carries no labels
        assert full_res and all(labels[t] != -100 for t in full_res)  # never a newline or base-view token
        colour = 1 + list(COLORS).index(sample.meta["fields"][0]["color"])
        assert any(labels[t] // 16 == colour for t in full_res)  # the field's box colour is under its tokens
        assert labels[16:].ne(-100).sum() == 8 * 8  # every full-resolution token has a label, newlines none


def test_asked_classes_curriculum_and_new_options_are_validated():
    from mmreduce.eval.benchmarks import Sample
    from mmreduce.eval.tiny_models import TINY_MODELS
    from mmreduce.eval.testbed.train_tiny import _asked, _crowding

    def ask(question):
        from PIL import Image

        return Sample(images=[Image.new("RGB", (8, 8))], question=question, answer="a", choices=("a",), meta={})

    assert _asked(ask("where is the red object relative to the blue object ?"), "shapes") == ([1, 3], [])
    assert _asked(ask("is there a green cross ?"), "shapes") == ([2], [4])
    assert _asked(ask("what color is the box with the 5 ?"), "docs") == ([], [6])
    cfg = TrainConfig(curriculum=((0, 1), (10, 4)))
    assert _crowding(cfg, TINY_MODELS["tiny-llava-shapes"], 9) == {"min_objects": 1, "max_objects": 1}
    assert _crowding(cfg, TINY_MODELS["tiny-llava-shapes"], 10)["max_objects"] == 4
    assert _crowding(cfg, TINY_MODELS["tiny-llava-next-docs"], 0) == {"min_fields": 2, "max_fields": 2}
    assert _crowding(TrainConfig(), TINY_MODELS["tiny-llava-shapes"], 0) == {}
    for bad, message in [(dict(curriculum=((5, 1),)), "curriculum"), (dict(value_aux_weight=1.0), "grounding_layers"),
                         (dict(deep_layers=(0,)), "deep_layers"), (dict(match_layer=-1), "match_layer")]:
        with pytest.raises(ValueError, match=message):
            TrainConfig(**bad)


def test_attention_report_masses_add_up_and_objects_match_the_pixels():
    from mmreduce.eval.testbed.attention_report import attention_mass
    from mmreduce.eval.benchmarks import load_benchmark
    from mmreduce.eval.tiny_models import build_tiny, format_prompt

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


def test_grounding_probe_losses_match_the_models_own_attention_weights():
    """Mass and contrast terms recomputed from eager attention weights (head 0 only, `heads=1`)."""
    from mmreduce.eval.testbed.grounding import GroundingProbe
    from mmreduce.eval.benchmarks import load_benchmark
    from mmreduce.eval.tiny_models import build_tiny, format_prompt
    from mmreduce.eval.testbed.train_tiny import _other_objects
    from mmreduce.eval.testbed.grounding import target_positions

    model, processor = build_tiny("tiny-llava-shapes", attn_implementation="eager")
    sample = next(s for s in load_benchmark("shapes", "test", 20, seed=5) if len(s.meta["objects"]) >= 3)
    inputs = processor(images=[sample.image], text=[format_prompt(sample.question)], return_tensors="pt")
    ids = inputs["input_ids"]
    vision = (ids[0] == model.config.image_token_id).nonzero().squeeze(1)
    targets = target_positions(sample, vision, model.config)
    others = _other_objects(sample, vision, model.config, targets)
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


def test_relevance_roles_mark_the_cells_under_each_asked_object():
    """Roles against pixel arithmetic: a cell is under an object when the object's box meets the cell's 8 px square;
    the reference object of a `position` question (the second box) gets role 2, the asked one role 1."""
    from mmreduce.eval.benchmarks import load_benchmark
    from mmreduce.eval.tiny_models import build_tiny
    from mmreduce.eval.testbed.train_tiny import _relevance_targets

    model, _ = build_tiny("tiny-llava-shapes")
    samples = load_benchmark("shapes", "test", 10, seed=4)  # two of each question type
    assert {s.meta["qtype"] for s in samples} >= {"position", "count", "exists"}
    for sample in samples:
        expected = torch.zeros(256, dtype=torch.long)
        for i, (x0, y0, x1, y1) in enumerate(sample.meta["target_boxes"]):
            for cell in range(256):
                r, c = divmod(cell, 16)
                if x0 <= 8 * c + 7 and x1 >= 8 * c and y0 <= 8 * r + 7 and y1 >= 8 * r:
                    expected[cell] = 2 if sample.meta["qtype"] == "position" and i == 1 else 1
        roles = _relevance_targets(sample, 256, model.config)
        assert torch.equal(roles, expected)
        if sample.meta["qtype"] == "position":
            assert set(roles.unique().tolist()) == {0, 1, 2}
        if sample.meta["qtype"] == "exists" and sample.answer == "no":
            assert roles.sum() == 0  # nothing in the image is the asked object


def test_question_first_prompts_come_from_the_checkpoints_own_template(tmp_path):
    from dataclasses import replace

    from mmreduce.eval.tiny_models import TINY_MODELS, build_processor, format_prompt, prompt_for
    from mmreduce.eval.testbed.train_tiny import _question_first

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
    from transformers import AutoProcessor

    assert _question_first(AutoProcessor.from_pretrained(tmp_path, local_files_only=True))
    for bad, message in [(dict(question_first=True), "extra_questions=0"),
                         (dict(relevance_layer=3, extra_questions=0), "question_first"),
                         (dict(question_first=True, extra_questions=0, copy_layer=-1), "copy_layer")]:
        with pytest.raises(ValueError, match=message):
            TrainConfig(**bad)


def test_question_first_run_with_a_vision_warmup_ships_its_prompt_order(tmp_path, monkeypatch):
    """The new recipe end to end for two steps: image-only steps first (logged), then language steps with the
    relevance and copy heads; the checkpoint answers prompts in its own (question-first) order."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from mmreduce.eval.tiny_models import load_tiny, prompt_for

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


def test_finishing_stage_runs_as_a_second_stage_from_the_first_stages_weights(tmp_path, monkeypatch):
    """`--finish-steps` = a second command with --init-from OUT --data-offset STEPS: one log, two configs."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from mmreduce.eval.testbed.train_tiny import main

    out = tmp_path / "two"
    common = ["tiny-llava-shapes", "--steps", "2", "--batch-size", "2", "--eval-every", "0", "--eval-samples", "2",
              "--question-first", "--extra-questions", "0", "--vision-steps", "1", "--vision-batch-size", "2",
              "--out", str(out)]
    with pytest.raises(ValueError, match="qtypes"):  # before the first stage: nothing is trained or written
        main([*common, "--finish-steps", "1", "--finish-qtypes", "count,nope"])
    with pytest.raises(ValueError, match="--finish-lr need --finish-steps"):
        main([*common, "--finish-lr", "1e-4"])
    assert not out.exists()
    assert main([*common, "--finish-steps", "1", "--finish-qtypes", "count", "--finish-lr", "1e-4"]) == 0
    configs = [json.loads(line.split(" config ", 1)[1]) for line in (tmp_path / "two.train.log").read_text().splitlines()
               if " config " in line]
    assert len(configs) == 2
    first, second = configs
    assert (first["init_from"], first["vision_steps"], first["qtypes"]) == ("", 1, [])
    assert second["init_from"] == str(out) and second["data_offset"] == 2 and second["steps"] == 1
    assert (second["vision_steps"], second["qtypes"], second["lr"]) == (0, ["count"], 1e-4)
    assert json.loads((out / "train_config.json").read_text())["config"]["steps"] == 1  # the last stage's


def test_patch_loss_object_focus_adds_the_object_tokens_mean():
    from mmreduce.eval.testbed.train_tiny import _aux_loss, _patch_accuracy, _patch_loss

    torch.manual_seed(0)
    head = torch.nn.Linear(4, 12)
    features = torch.randn(2, 5, 4)
    targets = torch.tensor([[0, 0, 8 * 2 + 3, 0, 0], [8 * 1 + 1, 0, 0, 0, 0]])  # two object tokens
    plain = _patch_loss(head, features, targets, "shapes", 0, object_focus=False)
    focused = _patch_loss(head, features, targets, "shapes", 0, object_focus=True)
    assert torch.allclose(plain, _aux_loss(head, features, targets, "shapes"))
    objects = _aux_loss(head, features[targets > 0], targets[targets > 0], "shapes")
    assert torch.allclose(focused - plain, objects)
    logits = head(features[targets > 0])
    colour = (logits[:, :7].argmax(-1) == torch.tensor([2, 1])).float().mean().item()
    shape = (logits[:, 7:12].argmax(-1) == torch.tensor([3, 1])).float().mean().item()
    assert _patch_accuracy(head, features, targets, "shapes") == (colour, shape)


def test_named_classes_by_role_split_position_colours_as_the_scene_places_them():
    """By role, a `position` question's asked colour is the first target object's colour in the scene and the
    reference colour the second's; other question types name only asked classes. Checked against the drawn
    objects, not the question text; without roles both colours share one multi-hot."""
    from mmreduce.eval.benchmarks import load_benchmark
    from mmreduce.eval.benchmarks.draw import COLORS, SHAPES
    from mmreduce.eval.testbed.train_tiny import _named_classes

    samples = load_benchmark("shapes", "test", 10, seed=4)
    width = 1 + len(COLORS) + 1 + len(SHAPES)
    plain, by_role = _named_classes(samples, "shapes"), _named_classes(samples, "shapes", by_role=True)
    assert plain.shape == (10, width) and by_role.shape == (10, 2 * width)
    colour_id = {c: 1 + i for i, c in enumerate(COLORS)}
    for b, sample in enumerate(samples):
        if sample.meta["qtype"] == "position":
            asked, reference = [o["color"] for o in sample.meta["objects"] if o["target"]]
            assert by_role[b].nonzero().flatten().tolist() == [colour_id[asked], width + colour_id[reference]]
            assert plain[b].nonzero().flatten().tolist() == sorted([colour_id[asked], colour_id[reference]])
        else:
            assert torch.equal(by_role[b, :width], plain[b]) and by_role[b, width:].sum() == 0
    with pytest.raises(ValueError, match="copy_roles needs copy_layer"):
        TrainConfig(copy_roles=True)


def test_role_probe_reads_a_planted_direction_not_noise_and_checks_its_model():
    """The probe behind eval/TRAINING.md's role figures: near 1 on a label planted in one feature, near chance on
    random labels; the report has one entry per decoder-layer input and counts same-axis errors among all errors."""
    from mmreduce.eval.testbed.role_probe import linear_probe_accuracy, role_report

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
