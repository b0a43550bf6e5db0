"""`ModelAdapter.token_layout` of InternVL, Qwen2-VL / Qwen2.5-VL and the DocOwl stand-in: one cell per vision token
of a real processor batch, in the order the text model sees them, hand-checked cells, and the panels' pixels."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from mmreduce.adapters import get_adapter
from mmreduce.adapters.base import END_OF_PANEL, ImageGrid, Panel, PatchPacking, TokenCell
from tests.support.vlm_factory import (
    _select_qwen_sample,
    qwen2_vl_batch,
    qwen2_vl_video_batch,
    tiny_docowl_with_batch,
    tiny_internvl_with_batch,
    tiny_qwen2_5_vl,
    tiny_qwen2_vl,
)


# ---- InternVL -------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def internvl_docs():
    from mmreduce.eval.tiny_models import load_tiny

    return load_tiny("tiny-internvl-docs")


def _internvl_page(processor, size):
    from mmreduce.demo.compare import prepare_inputs

    return prepare_inputs(processor, [Image.new("RGB", size, (255, 255, 255))], "what digit is in the cyan box ?")


def test_internvl_page_crops_then_thumbnail(internvl_docs):
    model, processor = internvl_docs
    batch = _internvl_page(processor, (128, 128))  # 2 x 2 tiles of 64 px + thumbnail, 16 tokens each
    cells, [grid] = get_adapter(model).token_layout(batch)
    assert len(cells) == int(get_adapter(model).count_vision_tokens(batch["input_ids"])[0]) == 80
    assert grid.crops == (2, 2) and grid.side == 4 and len(grid.panels) == 5
    assert cells[0] == TokenCell(0, 1, 0, 0) and cells[5] == TokenCell(0, 1, 1, 1)
    assert cells[16] == TokenCell(0, 2, 0, 0)  # tile 2's first token
    assert all(cell.panel == 0 for cell in cells[64:]) and cells[64] == TokenCell(0, 0, 0, 0)  # thumbnail last
    assert cells[-1] == TokenCell(0, 0, 3, 3)
    # panel 0 is the thumbnail, the last of the image's tiles in pixel_values; crop k is tile k - 1
    assert grid.panels[0].index == (4,) and [p.index for p in grid.panels[1:]] == [(0,), (1,), (2,), (3,)]
    assert torch.equal(grid.panels[2].pixels(batch), batch["pixel_values"][1])


def test_internvl_tile_grid_is_the_processors(internvl_docs):
    from transformers.models.got_ocr2.image_processing_got_ocr2 import get_optimal_tiled_canvas

    model, processor = internvl_docs
    adapter = get_adapter(model)
    image_processor = processor.image_processor
    tile = (image_processor.size.height, image_processor.size.width)
    for width, height in ((64, 64), (100, 300), (300, 100), (130, 60), (192, 128), (200, 190), (70, 260)):
        batch = _internvl_page(processor, (width, height))
        cells, [grid] = adapter.token_layout(batch)
        tiles = batch["pixel_values"].shape[0]
        assert len(cells) == int(adapter.count_vision_tokens(batch["input_ids"])[0]) == 16 * tiles
        cols, rows = get_optimal_tiled_canvas((height, width), tile, image_processor.min_patches,
                                              image_processor.max_patches)
        assert grid.crops == ((0, 0) if tiles == 1 else (rows, cols)), (width, height)
        assert tiles == (1 if rows * cols == 1 else rows * cols + 1)


def test_internvl_layout_of_two_images_and_one_tile(internvl_docs):
    from mmreduce.demo.compare import prepare_inputs

    model, processor = internvl_docs
    images = [Image.new("RGB", (64, 64)), Image.new("RGB", (128, 64))]  # one tile; 1 x 2 crops + thumbnail
    batch = prepare_inputs(processor, images, "what digit is in the cyan box ?")
    cells, grids = get_adapter(model).token_layout(batch)
    assert len(cells) == 16 + 48
    assert [g.crops for g in grids] == [(0, 0), (1, 2)]
    assert cells[15] == TokenCell(0, 0, 3, 3) and cells[16] == TokenCell(1, 1, 0, 0)
    assert cells[-16] == TokenCell(1, 0, 0, 0)
    assert grids[0].panels[0].index == (0,) and grids[1].panels[0].index == (3,)


def test_internvl_layout_needs_image_sizes(internvl_docs):
    model, processor = internvl_docs
    batch = _internvl_page(processor, (128, 128))
    batch.pop("image_sizes")
    with pytest.raises(ValueError, match="needs `image_sizes`"):
        get_adapter(model).token_layout(batch)


def test_internvl_factory_batch_and_pixel_shuffle_order():
    model, batch = tiny_internvl_with_batch(layers=1, image_sizes=((56, 112),), prompt_lengths=((3, 5),))
    batch["image_sizes"] = torch.tensor([[56, 112]])
    cells, [grid] = get_adapter(model).token_layout(batch)
    assert len(cells) == int(get_adapter(model).count_vision_tokens(batch["input_ids"])[0]) == 48
    assert grid.crops == (1, 2) and cells[16] == TokenCell(0, 2, 0, 0) and cells[32].panel == 0
    # a tile's tokens after the pixel shuffle: row-major, token (r, c) from patches 2r..2r+1 x 2c..2c+1
    side = 8
    index = torch.arange(side * side, dtype=torch.float32).view(1, side, side, 1)
    shuffled = model.model.pixel_shuffle(index, scale_factor=0.5).reshape(16, 4)
    for token, (r, c) in enumerate((r, c) for r in range(4) for c in range(4)):
        patches = [side * (2 * r + i) + 2 * c + j for i in (0, 1) for j in (0, 1)]
        assert sorted(shuffled[token].long().tolist()) == patches


# ---- Qwen2-VL / Qwen2.5-VL ------------------------------------------------------------------------------------

@pytest.mark.parametrize("build", [tiny_qwen2_vl, tiny_qwen2_5_vl])
def test_qwen_image_layout_counts(build):
    model = build(layers=1)
    adapter = get_adapter(model)
    batch = qwen2_vl_batch(model)  # 48x64, 60x30, 50x50 -> 6x8, 8x4, 6x6 merged tokens
    for index, shape in enumerate([(6, 8), (8, 4), (6, 6)]):
        sample = _select_qwen_sample(batch, index)
        cells, [grid] = adapter.token_layout(sample)
        assert len(cells) == int(adapter.count_vision_tokens(sample["input_ids"])[0]) == shape[0] * shape[1]
        assert (grid.panels[0].rows, grid.panels[0].cols) == shape and grid.frames == 0
        assert cells[shape[1]] == TokenCell(0, 0, 1, 0) and cells[-1] == TokenCell(0, 0, shape[0] - 1, shape[1] - 1)


def test_qwen_video_has_one_panel_per_temporal_slice():
    model = tiny_qwen2_vl(layers=1)
    batch = qwen2_vl_video_batch(model)  # 4 x 40x48 -> t=2 slices of 5x6 tokens; 6 x 32x32 -> t=3 of 4x4
    for index, (t, rows, cols) in enumerate([(2, 5, 6), (3, 4, 4)]):
        sample = _select_qwen_sample(batch, index)
        cells, [grid] = get_adapter(model).token_layout(sample)
        assert len(cells) == int(get_adapter(model).count_vision_tokens(sample["input_ids"])[0]) == t * rows * cols
        assert grid.frames == t and len(grid.panels) == t
        assert cells[rows * cols] == TokenCell(0, 1, 0, 0) and cells[-1] == TokenCell(0, t - 1, rows - 1, cols - 1)
        assert tuple(grid.panels[1].pixels(sample).shape) == (3, rows * 8, cols * 8)


def test_qwen_image_then_video_in_one_prompt():
    model = tiny_qwen2_vl(layers=1)
    image = _select_qwen_sample(qwen2_vl_batch(model), 0)
    video = _select_qwen_sample(qwen2_vl_video_batch(model), 1)
    ids = torch.cat([image["input_ids"], video["input_ids"]], dim=1)
    prompt = {"input_ids": ids, "pixel_values": image["pixel_values"], "image_grid_thw": image["image_grid_thw"],
              "pixel_values_videos": video["pixel_values_videos"], "video_grid_thw": video["video_grid_thw"]}
    cells, grids = get_adapter(model).token_layout(prompt)
    assert len(cells) == 48 + 48 and cells[48] == TokenCell(1, 0, 0, 0) and cells[-1] == TokenCell(1, 2, 3, 3)
    assert [g.frames for g in grids] == [0, 3]


def test_qwen_patches_unpack_to_the_picture():
    from transformers import Qwen2VLImageProcessorPil

    processor = Qwen2VLImageProcessorPil(patch_size=4, merge_size=2, temporal_patch_size=2, do_rescale=False,
                                         do_normalize=False, size={"shortest_edge": 256, "longest_edge": 4096})
    array = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)  # a multiple of 8: no resize
    out = processor(images=[Image.fromarray(array)], return_tensors="pt")
    t, h, w = out["image_grid_thw"][0].tolist()
    picture = PatchPacking(0, (t, h, w), patch=4, merge=2, temporal_patch=2).unpack(out["pixel_values"])
    assert np.array_equal(picture.permute(1, 2, 0).round().to(torch.uint8).numpy(), array)


def test_qwen_overlay_darkens_the_dropped_tokens():
    from mmreduce.demo.overlay import draw_kept_tokens

    model = tiny_qwen2_vl(layers=1)
    sample = _select_qwen_sample(qwen2_vl_batch(model), 0)  # 48 x 64 px, 6 x 8 tokens of 8 px
    sample["pixel_values"] = torch.ones_like(sample["pixel_values"])  # white once un-normalised (mean 0, std 1)
    processor = SimpleNamespace(image_processor=SimpleNamespace(image_mean=[0.0] * 3, image_std=[1.0] * 3))
    positions = get_adapter(model).vision_mask(input_ids=sample["input_ids"])[0].nonzero().flatten().tolist()
    kept = [p for i, p in enumerate(positions) if i % 8 < 4]  # the left half of every token row
    [(picture, _)] = draw_kept_tokens(get_adapter(model), processor, sample, positions, {1: kept}, "q")
    step = picture.width // 8
    assert picture.height == 6 * step
    centre = lambda r, c: picture.getpixel((c * step + step // 2, r * step + step // 2))  # noqa: E731
    assert min(centre(2, 3)) > 200 and max(centre(2, 4)) < 100


# ---- DocOwl stand-in ------------------------------------------------------------------------------------------

def test_docowl_layout_in_the_text_models_order():
    from mmreduce.eval.docowl import DocProcessor

    model, batch = tiny_docowl_with_batch(layers=1, image_sizes=((56, 112),), prompt_lengths=((3, 5),))
    _, positions, _ = DocProcessor(image_size=56)(Image.new("RGB", (112, 56)), "<|image|>")  # global + 1 x 2
    batch["patch_positions"] = positions
    adapter = get_adapter(model)
    cells, [grid] = adapter.token_layout(batch)
    with torch.no_grad():
        indicators = model.model(**batch).modality_indicators
    assert len(cells) == int(adapter.count_vision_tokens(batch["input_ids"])[0]) == int(indicators.sum()) == 3 * 17
    assert grid.crops == (1, 2) and (grid.panels[0].rows, grid.panels[0].cols) == (8, 2)  # 8 x 8 patches, 1x4
    assert cells[0] == TokenCell(0, 0, 0, 0) and cells[15] == TokenCell(0, 0, 7, 1)
    assert cells[16] == TokenCell(0, END_OF_PANEL, 0, -1)  # the global image's vit_eos
    assert cells[17] == TokenCell(0, 1, 0, 0) and cells[-1] == TokenCell(0, END_OF_PANEL, 2, -1)
    assert [p.index for p in grid.panels] == [(0,), (1,), (2,)]
    # H-Reducer token (r, c) depends on patch row r, patches 4c .. 4c+3 only: change patch (3, 5) -> token (3, 1)
    states = torch.randn(1, 1 + 64, 32)
    moved = states.clone()
    moved[0, 1 + 3 * 8 + 5] += 1.0
    with torch.no_grad():
        changed = (model.model.vision2text(states) != model.model.vision2text(moved)).any(-1)[0]
    assert changed.nonzero().flatten().tolist() == [3 * 2 + 1]
    batch.pop("patch_positions")
    with pytest.raises(ValueError, match="needs `patch_positions`"):
        adapter.token_layout(batch)


def test_docowl_overlay_marks_each_panels_eos():
    from mmreduce.demo.overlay import _compose

    grid = ImageGrid((1, 2), 0, tuple(Panel(8, 2, index=(i,)) for i in range(3)))
    cells = [TokenCell(0, p, r, c) for p in (0, 1, 2) for r in range(8) for c in range(2)]
    cells += [TokenCell(0, END_OF_PANEL, p, -1) for p in (0, 1, 2)]
    panels = [Image.new("RGB", (56, 56), (255, 255, 255)) for _ in range(3)]
    kept = [cell.panel != 1 for cell in cells]  # crop 1's grid dropped, every other token (the eos ones too) kept
    picture = _compose(panels, grid, cells, kept, grid.panels)
    scale = 3  # ceil(160 / 56)
    assert picture.height == 56 * scale + max(4, 56 * scale // 8 // 2)
    left = 56 * scale + 12
    assert min(picture.getpixel((left + 10, 10))) < 100  # crop 1 dropped
    assert min(picture.getpixel((left + 56 * scale + 1 + 10, 10))) > 200  # crop 2 kept
    assert picture.getpixel((2, 56 * scale + 4)) == (46, 160, 67)  # the global image's eos kept
