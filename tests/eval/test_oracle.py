"""The oracle reference (mmreduce.eval.oracle): token rectangles in image pixels, the kept tokens, the bench rows.

References are independent of the code: rectangles computed by hand from the processors' geometry, and where a
coloured block lands in the crops that transformers' own LLaVA-NeXT image processor cuts.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from PIL import Image

import mmreduce
from mmreduce.adapters import get_adapter
from mmreduce.adapters.base import NEWLINE, ImageGrid, Panel, TokenCell
from mmreduce.eval.benchmarks import Sample
from mmreduce.eval.oracle import OracleKeep, boxes_overlap, oracle_keep_ratio, token_boxes
from mmreduce.spec import parse_spec
from tests.support.vlm_factory import llava_batch, tiny_llava


def _grid_cells(image: int, panel: int, side: int) -> list[TokenCell]:
    return [TokenCell(image, panel, r, c) for r in range(side) for c in range(side)]


def test_llava_cell_covers_its_sixteenth_of_the_image():
    cells = _grid_cells(0, 0, 4)
    rects = token_boxes(cells, [ImageGrid((0, 0), 4)], [(64, 64)])
    assert rects[1 * 4 + 2].tolist() == [32.0, 16.0, 48.0, 32.0]  # cell (1, 2): x 32..48, y 16..32
    assert rects[0].tolist() == [0.0, 0.0, 16.0, 16.0] and rects[-1].tolist() == [48.0, 48.0, 64.0, 64.0]
    # A non-square image: panel 0 is laid over the whole image, each axis on its own.
    wide = token_boxes(cells, [ImageGrid((0, 0), 4)], [(32, 128)])  # (height, width)
    assert wide[1 * 4 + 2].tolist() == [64.0, 8.0, 96.0, 16.0]


def test_next_crop_letterboxed_by_hand():
    """An 80 x 20 image on a 2 x 2 canvas of 32 px crops: scaled by 64/80 = 0.8 to 64 x 16 (ceil(20·0.8) = 16),
    centred with 24 px of padding above and below."""
    grid = ImageGrid((2, 2), 2)
    cells = [TokenCell(0, 3, 0, 1), TokenCell(0, 1, 0, 0), TokenCell(0, 1, 1, 1), TokenCell(0, NEWLINE, 0, -1)]
    rects = token_boxes(cells, [grid], [(20, 80)], canvas="letterbox", tile_px=32)
    # Crop 3 = crop row 1, col 0; its cell (0, 1) is canvas x 16..32, y 32..48 -> image x 20..40, y (32-24)/0.8 = 10
    # .. (48-24)/0.8 = 30, clipped to the image's 20 rows.
    assert rects[0].tolist() == pytest.approx([20.0, 10.0, 40.0, 20.0])
    # Crop 1's cell (0, 0) is canvas y 0..16: all padding, no area, overlapping nothing.
    assert rects[1, 1] == rects[1, 3] == 0.0
    assert not boxes_overlap(rects[1:2], [(0, 0, 79, 19)]).any()
    # Crop 1's cell (1, 1) is canvas x 16..32, y 16..32: image y 0..10 (its first 8 canvas rows are padding).
    assert rects[2].tolist() == pytest.approx([20.0, 0.0, 40.0, 10.0])
    assert torch.isnan(rects[3]).all()  # the newline token covers no pixels


def test_next_crops_match_transformers_processor():
    """A red block drawn on the image lands, in the crops transformers' LlavaNextImageProcessor cuts, exactly in the
    token cells whose rectangles overlap the block in the original image (a 64 x 16 image letterboxed on a 64 x 64
    canvas of 2 x 2 crops of 32 px, 4 x 4 tokens of 8 px each)."""
    from transformers import LlavaNextImageProcessor

    image = Image.new("RGB", (64, 16), "white")
    block = (40, 4, 47, 11)  # inclusive pixel box
    image.paste((255, 0, 0), (block[0], block[1], block[2] + 1, block[3] + 1))
    processor = LlavaNextImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                        image_grid_pinpoints=[[64, 64]], do_normalize=False)
    pixels = processor(images=[image], return_tensors="pt")["pixel_values"][0]  # (1 + 4, 3, 32, 32) in [0, 1]
    cells = [cell for panel in range(1, 5) for cell in _grid_cells(0, panel, 4)]
    rects = token_boxes(cells, [ImageGrid((2, 2), 4)], [(16, 64)], canvas="letterbox", tile_px=32)
    expected = boxes_overlap(rects, [block])
    red = []
    for cell in cells:
        window = pixels[cell.panel, :, cell.row * 8:(cell.row + 1) * 8, cell.col * 8:(cell.col + 1) * 8]
        red.append(bool(((window[0] > 0.75) & (window[1] < 0.25)).any()))
    assert expected.tolist() == red
    assert sum(red) == 2  # crop 2's cell (3, 1) and crop 4's cell (0, 1): the block straddles the crop rows


def test_internvl_tile_and_thumbnail_stretch():
    """GotOcr2 tiling: a 256 x 32 image is resized to a 1 x 2 canvas of tiles (x / 2, y x 2); the thumbnail
    (panel 0) is the whole image."""
    grid = ImageGrid((1, 2), 2, (Panel(2, 2), Panel(2, 2), Panel(2, 2)))
    cells = [TokenCell(0, 2, 1, 0), TokenCell(0, 0, 0, 1), TokenCell(0, 1, 0, 0)]
    rects = token_boxes(cells, [grid], [(32, 256)], canvas="stretch")
    assert rects[0].tolist() == [128.0, 16.0, 192.0, 32.0]  # crop 2 (col 1), cell (1, 0)
    assert rects[1].tolist() == [128.0, 0.0, 256.0, 16.0]  # thumbnail cell (0, 1)
    assert rects[2].tolist() == [0.0, 0.0, 64.0, 16.0]


def test_internvl_tiles_match_transformers_processor():
    """A red block on a 128 x 64 image lands, in the tiles and thumbnail of transformers' GotOcr2ImageProcessor
    (InternVL's tiling: 2 x 1 tiles of 32 px, 4 x 4 tokens of 8 px each), exactly in the token cells whose
    rectangles overlap the block in the original image."""
    from transformers import GotOcr2ImageProcessor
    from transformers.models.got_ocr2.image_processing_got_ocr2 import get_optimal_tiled_canvas

    image = Image.new("RGB", (128, 64), "white")
    block = (32, 16, 95, 47)  # inclusive; on the canvas (x / 2, y / 2) and the thumbnail (x / 4, y / 2) it fills
    image.paste((255, 0, 0), (block[0], block[1], block[2] + 1, block[3] + 1))  # whole token cells
    processor = GotOcr2ImageProcessor(crop_to_patches=True, min_patches=1, max_patches=4,
                                      size={"height": 32, "width": 32}, do_normalize=False)
    tiles = processor(images=[image], return_tensors="pt")["pixel_values"]  # (2 crops + thumbnail, 3, 32, 32)
    assert get_optimal_tiled_canvas((64, 128), (32, 32), 1, 4) == (2, 1) and tiles.shape[0] == 3
    pictures = {1: tiles[0], 2: tiles[1], 0: tiles[2]}  # panel -> picture: crops first, then the thumbnail
    cells = [cell for panel in (1, 2, 0) for cell in _grid_cells(0, panel, 4)]
    grid = ImageGrid((1, 2), 4, (Panel(4, 4), Panel(4, 4), Panel(4, 4)))
    expected = boxes_overlap(token_boxes(cells, [grid], [(64, 128)], canvas="stretch"), [block])
    red = []
    for cell in cells:
        window = pictures[cell.panel][:, cell.row * 8:(cell.row + 1) * 8, cell.col * 8:(cell.col + 1) * 8]
        red.append(bool(((window[0] > 0.75) & (window[1] < 0.25)).any()))
    assert expected.tolist() == red
    assert sum(red) == 8 + 4  # 4 x 2 cells across the two crops, 2 x 2 in the thumbnail


def test_token_boxes_refusals():
    with pytest.raises(ValueError, match="not known to the oracle"):
        token_boxes([TokenCell(0, 1, 0, 0)], [ImageGrid((1, 2), 2)], [(32, 64)])
    with pytest.raises(ValueError, match="crop grid"):
        token_boxes([TokenCell(0, 1, 0, 0)], [ImageGrid((0, 0), 2, (Panel(2, 2), Panel(2, 2)))], [(32, 64)],
                    canvas="stretch")
    with pytest.raises(ValueError, match="temporal slices"):
        token_boxes([TokenCell(0, 0, 0, 0)], [ImageGrid((0, 0), 2, (Panel(2, 2),), frames=2)], [(32, 32)])
    with pytest.raises(ValueError, match="only 1 grids"):
        token_boxes([TokenCell(1, 0, 0, 0)], [ImageGrid((0, 0), 2)], [(32, 32)])
    with pytest.raises(ValueError, match="tile_px"):
        token_boxes([], [], [], canvas="letterbox")


def test_boxes_overlap_is_inclusive_like_the_benchmarks():
    """Box pixel x1 is inside the box: a box ending on pixel 15 touches the 16 px cell 0 only, one ending on 16
    touches cell 1 too (as eval/testbed/tiny_quality.target_scores counts patches)."""
    rects = token_boxes(_grid_cells(0, 0, 4), [ImageGrid((0, 0), 4)], [(64, 64)])
    assert boxes_overlap(rects, [(0, 0, 15, 15)]).nonzero().flatten().tolist() == [0]
    assert boxes_overlap(rects, [(0, 0, 16, 15)]).nonzero().flatten().tolist() == [0, 1]


def _sample(box, size=32) -> Sample:
    return Sample(images=[Image.new("RGB", (size, size))], question="what ?", answer="a", choices=("a", "b"),
                  meta={"target_boxes": [box]})


def _oracle_kept(method: OracleKeep, boxes) -> list[list[int]]:
    """Vision-token indices (row-major over the 8 x 8 grid) each sample keeps, through wrap() on a tiny LLaVA."""
    model = tiny_llava(layers=2)
    batch = llava_batch()
    method.bind([_sample(box) for box in boxes], batch, get_adapter(model))
    with mmreduce.wrap(model, method) as reduced, torch.inference_mode():
        reduced(**batch)
        stats = reduced.stats
    return [[stats.vision_positions[row].index(p) for p in kept] for row, kept in enumerate(stats.kept_positions[0])]


def test_oracle_keeps_every_target_token_within_budget():
    """32 px image, 8 x 8 tokens of 4 px: an inclusive box x 4..11, y 8..15 covers columns 1-2 of rows 2-3."""
    boxes = [(4, 8, 11, 15), (0, 0, 3, 3), (28, 28, 31, 31)]
    expected = [{2 * 8 + 1, 2 * 8 + 2, 3 * 8 + 1, 3 * 8 + 2}, {0}, {63}]
    kept = _oracle_kept(OracleKeep(keep_ratio=0.25), boxes)
    for tokens, targets in zip(kept, expected):
        assert len(tokens) == 16  # ⌈0.25 · 64⌉
        assert targets <= set(tokens)
    # Below the target count, every kept token is a target.
    few = _oracle_kept(OracleKeep(keep_ratio=2 / 64), boxes)
    assert [len(t) for t in few] == [2, 2, 2]
    assert set(few[0]) <= expected[0]
    assert 0 in few[1] and 63 in few[2]
    # The fill is seeded: the same draw again, another one with another seed.
    assert _oracle_kept(OracleKeep(keep_ratio=0.25), boxes) == kept
    assert _oracle_kept(OracleKeep(keep_ratio=0.25, seed=1), boxes) != kept


def test_oracle_refuses_unbound_and_boxless_use():
    model = tiny_llava(layers=2)
    batch = llava_batch()
    with pytest.raises(ValueError, match="not bound"), mmreduce.wrap(model, OracleKeep()) as reduced, \
            torch.inference_mode():
        reduced(**batch)
    boxless = [Sample(images=[Image.new("RGB", (32, 32))], question="q ?", answer="a", choices=("a",))] * 3
    with pytest.raises(ValueError, match="target_boxes"):
        OracleKeep().bind(boxless, batch, get_adapter(model))
    with pytest.raises(ValueError, match="keep_ratio"):
        OracleKeep(keep_ratio=0.0)
    with pytest.raises(ValueError, match="budget"):
        oracle_keep_ratio(-1, 64)


def test_oracle_budget_matches_an_equivalent_budget():
    """Of 256 tokens, equivalent=0.333 allows 85.2 tokens: 85 kept, as a fitted before-the-LLM method keeps."""
    ratio = oracle_keep_ratio(0.333, 256)
    assert math.ceil(ratio * 256 - 1e-9) == 85
    assert parse_spec("stride:equivalent=0.333").build(8, 256).kept_tokens(256) == 85
    assert oracle_keep_ratio(64, 256) == 0.25


def _bench(tmp_path, samples: int, *extra: str) -> dict:
    from mmreduce.cli import main

    out = tmp_path / "run"
    code = main(["bench", "--model", "tiny-llava-shapes", "--dataset", "shapes", "--samples", str(samples),
                 "--batch-size", "8", "--no-progress", "--device", "cpu", "--out", str(out), *extra])
    assert code == 0
    return json.loads((out / "results.json").read_text())


def test_bench_oracle_row_is_a_labelled_reference(tmp_path, capsys):
    results = _bench(tmp_path, 8, "--methods", "baseline", "stride:equivalent=0.25", "--oracle")["results"]
    assert [r["spec"] for r in results] == ["baseline", "stride:equivalent=0.25", "oracle@0.25 (upper reference)"]
    assert [r["reference"] for r in results] == [False, False, True]
    oracle = results[-1]
    assert oracle["samples"] == 8 and oracle["method"].startswith("oracle:keep_ratio=0.25")
    assert oracle["vision_tokens"] == 256 and oracle["equivalent_vision_tokens"] == pytest.approx(64)
    assert "oracle" not in mmreduce.list_methods()
    markdown = (tmp_path / "run" / "results.md").read_text()
    assert markdown.index("| stride") < markdown.index("| oracle@0.25 (upper reference)")
    assert "upper reference, not a method" in markdown
    caches = sorted(p.name for p in (tmp_path / "run" / "cache").iterdir())
    assert any(name.startswith("oracle_0_25") for name in caches)


def test_bench_oracle_beats_random_at_the_same_budget(tmp_path):
    results = _bench(tmp_path, 40, "--methods", "random:layer=1,equivalent=0.222", "--oracle-budgets", "0.222")
    random_row, oracle = results["results"]
    assert random_row["equivalent_vision_tokens"] == pytest.approx(oracle["equivalent_vision_tokens"], abs=1.0)
    assert oracle["reference"] and oracle["accuracy"] >= random_row["accuracy"]
