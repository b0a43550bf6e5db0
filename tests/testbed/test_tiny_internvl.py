"""The InternVL tiny recipe (`tiny-internvl-docs`): tokenizer and processor, where each vision token looks on the
page (the per-token targets, the grounding positions), a short training run that saves a loadable checkpoint, and
the shipped checkpoint."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from mmreduce.eval.benchmarks import load_benchmark
from mmreduce.eval.testbed.grounding import target_positions
from mmreduce.eval.testbed.train import TrainConfig, train
from mmreduce.eval.testbed.train.targets import (
    aux_targets,
    draw_label_map,
    internvl_tile_grid,
    patch_labels,
    relevance_targets,
    sequence_targets,
)
from mmreduce.eval.tiny_models import (
    DOCS_VOCABULARY,
    INTERNVL_TOKENS,
    TINY_MODELS,
    TinyVLMConfig,
    build_tiny,
    build_tokenizer,
    format_prompt,
    load_tiny,
    prompt_for,
)

NAME = "tiny-internvl-docs"
RECIPE = TINY_MODELS[NAME]


def test_tokenizer_adds_internvl_tokens_after_the_words_and_keeps_the_other_ids():
    plain, internvl = build_tokenizer(DOCS_VOCABULARY), build_tokenizer(DOCS_VOCABULARY, INTERNVL_TOKENS)
    assert {t: i for t, i in internvl.get_vocab().items() if t in plain.get_vocab()} == plain.get_vocab()
    assert [internvl.convert_tokens_to_ids(t) for t in INTERNVL_TOKENS] == [len(plain), len(plain) + 1, len(plain) + 2]
    assert internvl.context_image_token == "<image>" and internvl.start_image_token == "<img>"
    assert internvl.convert_ids_to_tokens(internvl("<img> <image> </img> red")["input_ids"]) == \
        ["<s>", "<img>", "<image>", "</img>", "red"]
    with pytest.raises(ValueError, match="extra special tokens"):
        build_tokenizer(DOCS_VOCABULARY, ("<x>",))
    with pytest.raises(ValueError, match="max_tiles"):
        TinyVLMConfig(name="x", arch="internvl", image_size=64, patch_size=8)
    with pytest.raises(ValueError, match="even number of patches"):
        TinyVLMConfig(name="x", arch="internvl", image_size=56, patch_size=8, max_tiles=4)


def test_a_page_is_four_tiles_and_a_thumbnail_of_sixteen_tokens_each():
    model, processor = build_tiny(NAME)
    assert type(model).__name__ == "InternVLForConditionalGeneration"
    assert model.config.text_config.model_type == "qwen2" and RECIPE.tokens_per_image == 16
    sample = load_benchmark("docs", "test", 1, **RECIPE.benchmark_options)[0]
    inputs = processor(images=[sample.image], text=[format_prompt(sample.question)], return_tensors="pt")
    ids = inputs["input_ids"][0]
    assert inputs["pixel_values"].shape == (5, 3, 64, 64)  # 2 x 2 crops + thumbnail
    assert (ids == model.config.image_token_id).sum() == 5 * 16 == 80
    words = processor.tokenizer.convert_ids_to_tokens(ids)
    start = words.index("<img>")
    assert words[start + 1:start + 81] == ["<image>"] * 80 and words[start + 81] == "</img>"
    assert internvl_tile_grid((128, 128), RECIPE) == (2, 2) and internvl_tile_grid((64, 64), RECIPE) == (1, 1)
    with pytest.raises(RuntimeError, match="tile canvas"):
        internvl_tile_grid((100, 128), RECIPE)


def _patch_pixels(pixel_values: torch.Tensor, patch: int) -> torch.Tensor:
    """Stand-in for the vision tower: CLS (zeros) + one feature per patch = its channel-mean pixels, row-major.
    (N, 3, S, S) -> (N, 1 + (S / patch)^2, patch^2)."""
    n, _, side, _ = pixel_values.shape
    g = side // patch
    grey = pixel_values.mean(1).reshape(n, g, patch, g, patch).permute(0, 1, 3, 2, 4)  # (N, gr, gc, py, px)
    return torch.cat([torch.zeros(n, 1, patch * patch), grey.reshape(n, g * g, patch * patch)], 1)


class _PassPatches(torch.nn.Module):
    def __init__(self, patch: int):
        super().__init__()
        self.patch = patch

    def forward(self, pixel_values: torch.Tensor, **_) -> SimpleNamespace:
        return SimpleNamespace(last_hidden_state=_patch_pixels(pixel_values, self.patch))


def _token_boxes(width: int, height: int, side: int = 64, cell: int = 16) -> list[tuple[int, int, int, int] | None]:
    """The page square (x0, y0, x1, y1) every vision token of a tiled page sees, in prompt order; None for the
    thumbnail's tokens. Written out independently of the training code."""
    boxes = []
    for tile_row in range(height // side):
        for tile_col in range(width // side):
            for i in range(side // cell):
                for j in range(side // cell):
                    x, y = tile_col * side + j * cell, tile_row * side + i * cell
                    boxes.append((x, y, x + cell - 1, y + cell - 1))
    if len(boxes) > (side // cell) ** 2:
        boxes += [None] * (side // cell) ** 2
    return boxes


def test_each_vision_token_sees_the_page_square_its_targets_describe():
    """Through the model's own image path (processor tiles, pixel shuffle, projector input) with a stand-in tower
    that passes each patch's pixels on: a token's pixels are exactly the 16 px page square `_token_boxes` names;
    the per-token targets are that square's label, and the grounding positions are the tokens whose square (or
    thumbnail cell) meets the asked field."""
    model, processor = build_tiny(NAME)
    inner = model.model
    patch = RECIPE.patch_size
    mean = torch.tensor(processor.image_processor.image_mean)[:, None, None]
    std = torch.tensor(processor.image_processor.image_std)[:, None, None]
    captured = {}
    inner.multi_modal_projector.register_forward_pre_hook(lambda m, args: captured.__setitem__("x", args[0]))
    inner.vision_tower = _PassPatches(patch)
    for sample in load_benchmark("docs", "test", 6, seed=5, **RECIPE.benchmark_options):
        inputs = processor(images=[sample.image], text=[format_prompt(sample.question, question_first=True)],
                           return_tensors="pt")
        with torch.no_grad():
            inner.get_image_features(pixel_values=inputs["pixel_values"])
        seen = captured["x"].flatten(0, 1)  # (tokens, 4 * patch^2): the token's four patches' pixels
        page = torch.from_numpy(np.asarray(sample.image, dtype=np.float32) / 255).permute(2, 0, 1)
        page = ((page - mean) / std).mean(0)  # (H, W), normalised as the processor does
        width, height = sample.image.size
        boxes = _token_boxes(width, height)
        assert seen.shape[0] == len(boxes) == 80
        labels = sequence_targets([sample], RECIPE)[0]
        assert torch.equal(aux_targets([sample], RECIPE, None).reshape(-1), labels)
        grid = patch_labels(draw_label_map(sample, (width, height)) % 16, 16, min_pixels=6)  # digit plane
        for k, box in enumerate(boxes):
            if box is None:
                assert labels[k] == -100  # the thumbnail is a down-scaled view: no target
                continue
            x0, y0, x1, y1 = box
            square = page[y0:y1 + 1, x0:x1 + 1].reshape(-1)
            assert torch.allclose(seen[k].sort().values, square.sort().values, atol=1e-4), (sample.meta["index"], k)
            assert labels[k] % 16 == grid[y0 // 16, x0 // 16]
        target = set(target_positions(sample, torch.arange(80), model.config).tolist())
        fx0, fy0, fx1, fy1 = sample.meta["target_boxes"][0]
        meets = {k for k, b in enumerate(boxes) if b and b[0] <= fx1 and b[2] >= fx0 and b[1] <= fy1 and b[3] >= fy0}
        assert meets and target - set(range(64)) and target & set(range(64)) == meets  # crops, plus thumbnail cells
        assert any(labels[k] % 16 == 1 + int(sample.meta["fields"][0]["digit"]) for k in meets)
        roles = relevance_targets(sample, 80, model.config)
        assert set(roles.nonzero().flatten().tolist()) == target


def test_one_step_question_first_run_saves_a_loadable_internvl_checkpoint(tmp_path, monkeypatch):
    """The recipe end to end for one image-only and one language step with the relevance, copy and grounding
    heads; the checkpoint loads offline with its processor and answers in its own (question-first) order."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "ivl"
    summary = train(TrainConfig(model=NAME, steps=1, batch_size=2, eval_every=0, eval_samples=2, out=str(out),
                                question_first=True, extra_questions=0, relevance_layer=3, copy_layer=2,
                                grounding_layers=(3, 4, 5), vision_steps=1, vision_batch_size=2))
    assert summary["history"][-1]["step"] == 1
    log = (tmp_path / "ivl.train.log").read_text()
    assert "vision step 0 patch_loss" in log and "step 0 loss" in log
    assert json.loads((out / "train_config.json").read_text())["config"]["model"] == NAME
    model, processor = load_tiny(out)
    assert type(model).__name__ == "InternVLForConditionalGeneration"
    assert type(processor).__name__ == "InternVLProcessor" and processor.image_processor.max_patches == 4
    assert prompt_for(processor, "what digit is in the red box ?").startswith("USER: what digit is in the red box ?")


def test_shipped_checkpoint_is_small_loads_offline_and_answers_from_the_choices(monkeypatch):
    from mmreduce.eval.accuracy import evaluate
    from mmreduce.eval.tiny_models import CHECKPOINT_DIR

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    path = CHECKPOINT_DIR / NAME
    assert sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) <= 15 * 2**20
    model, processor = load_tiny(NAME)
    assert type(model).__name__ == "InternVLForConditionalGeneration"
    assert next(model.parameters()).dtype == torch.float32 and model.config.text_config.num_hidden_layers == 8
    samples = load_benchmark("docs", "test", 8, seed=0, **RECIPE.benchmark_options)
    _, predictions = evaluate(model, processor, samples, batch_size=8)
    assert all(p in s.choices for p, s in zip(predictions, samples)), predictions
