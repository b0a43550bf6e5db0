"""train.targets: per-patch labels against hand-made and per-cell references, prompt-order targets against the
grounding boxes, the classes a question names, and image-token roles against pixel arithmetic."""

from __future__ import annotations

import numpy as np
import torch

from mmreduce.eval.benchmarks import Sample, load_benchmark
from mmreduce.eval.benchmarks.draw import COLORS, SHAPES
from mmreduce.eval.testbed.grounding import target_positions
from mmreduce.eval.testbed.train.targets import asked_classes, named_classes, patch_labels, relevance_targets, \
    sequence_targets
from mmreduce.eval.tiny_models import TINY_MODELS, build_tiny


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


def test_sequence_targets_put_each_field_where_the_grounding_boxes_are():
    """Two independent routes to 'which image tokens hold the asked field': the drawn label map in prompt order,
    and the target boxes through `target_positions`; the full-resolution token of the field must agree."""
    model, _ = build_tiny("tiny-llava-next-docs")
    recipe = TINY_MODELS["tiny-llava-next-docs"]
    for sample in load_benchmark("docs", "test", 12, seed=3):
        labels = sequence_targets([sample], recipe)[0]  # (n_vision,) in prompt order
        assert labels.numel() == 16 + 8 * 9  # base 4x4, then 8 rows of 8 tokens + a newline
        target = target_positions(sample, torch.arange(labels.numel()), model.config)
        full_res = [int(t) for t in target if t >= 16]  # the base view is down-scaled and carries no labels
        assert full_res and all(labels[t] != -100 for t in full_res)  # never a newline or base-view token
        colour = 1 + list(COLORS).index(sample.meta["fields"][0]["color"])
        assert any(labels[t] // 16 == colour for t in full_res)  # the field's box colour is under its tokens
        assert labels[16:].ne(-100).sum() == 8 * 8  # every full-resolution token has a label, newlines none


def test_asked_classes_are_the_colours_and_shapes_or_digits_the_question_names():
    from PIL import Image

    def ask(question):
        return Sample(images=[Image.new("RGB", (8, 8))], question=question, answer="a", choices=("a",), meta={})

    assert asked_classes(ask("where is the red object relative to the blue object ?"), "shapes") == ([1, 3], [])
    assert asked_classes(ask("is there a green cross ?"), "shapes") == ([2], [4])
    assert asked_classes(ask("what color is the box with the 5 ?"), "docs") == ([], [6])


def test_relevance_roles_mark_the_cells_under_each_asked_object():
    """Roles against pixel arithmetic: a cell is under an object when the object's box meets the cell's 8 px square;
    the reference object of a `position` question (the second box) gets role 2, the asked one role 1."""
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
        roles = relevance_targets(sample, 256, model.config)
        assert torch.equal(roles, expected)
        if sample.meta["qtype"] == "position":
            assert set(roles.unique().tolist()) == {0, 1, 2}
        if sample.meta["qtype"] == "exists" and sample.answer == "no":
            assert roles.sum() == 0  # nothing in the image is the asked object


def test_named_classes_by_role_split_position_colours_as_the_scene_places_them():
    """By role, a `position` question's asked colour is the first target object's colour in the scene and the
    reference colour the second's; other question types name only asked classes. Checked against the drawn
    objects, not the question text; without roles both colours share one multi-hot."""
    samples = load_benchmark("shapes", "test", 10, seed=4)
    width = 1 + len(COLORS) + 1 + len(SHAPES)
    plain, by_role = named_classes(samples, "shapes"), named_classes(samples, "shapes", by_role=True)
    assert plain.shape == (10, width) and by_role.shape == (10, 2 * width)
    colour_id = {c: 1 + i for i, c in enumerate(COLORS)}
    for b, sample in enumerate(samples):
        if sample.meta["qtype"] == "position":
            asked, reference = [o["color"] for o in sample.meta["objects"] if o["target"]]
            assert by_role[b].nonzero().flatten().tolist() == [colour_id[asked], width + colour_id[reference]]
            assert plain[b].nonzero().flatten().tolist() == sorted([colour_id[asked], colour_id[reference]])
        else:
            assert torch.equal(by_role[b, :width], plain[b]) and by_role[b, width:].sum() == 0
