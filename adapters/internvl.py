"""InternVL (`InternVLForConditionalGeneration`: InternVL2.5 / InternVL3 "-hf" checkpoints).

A prompt holds each image as `<img>` + `<IMG_CONTEXT>` x (tokens per tile x tiles) + `</img>`. The tiles are the
image's crops in row-major order followed by a thumbnail of the whole image (no thumbnail when the image is a
single tile); each tile gives (image_size / patch_size)^2 x downsample_ratio^2 tokens after the pixel shuffle and
the projector (256 for 448 px tiles, patch 14, ratio 0.5). The merge writes the features into the positions of
`config.image_token_id` (`<IMG_CONTEXT>`) only, so those are the vision tokens; `<img>` and `</img>` stay text and
are never dropped. Video frames use the same context token, so they are covered too.

Token layout (`token_layout`): image i's tokens are its crops' tokens, crop by crop in row-major order (panels
1 .. rows*cols), then the thumbnail's (panel 0); a one-tile image is panel 0 alone. Each tile's tokens are its
(S/p * ratio)^2 pixel-shuffled cells in row-major order (cell (r, c) covers patches 2r..2r+1 x 2c..2c+1 at ratio
0.5). The crop grid is not in the processor outputs: it is GotOcr2's choice for the image's original size (the
`image_sizes` (N, 2) (height, width) that `mmreduce.demo.compare.prepare_inputs` adds), restricted to the tile count
the prompt holds, which gives the processor's own grid whatever its min/max tile settings. The tiles' pixels are
`pixel_values` rows in prompt order (each image's crops, then its thumbnail). `batch_token_layout` (what the
before-the-LLM stage reads) needs no `image_sizes`, which the stock processor does not return: a tile is a fixed run
of context tokens, so crops are panels 1 .. n in the processor's order and only their place in the image (the
`ImageGrid.crops` grid) stays unknown, (0, 0).

Vision tower (for before-the-LLM methods that read it): InternViT has a CLS token first; its attention modules are
`encoder.layer[i].attention` with separate q/k projections and, where `use_qk_norm` is set (InternViT-6B), an RMSNorm
over the full width of q and of k before the heads are split, which the default probe applies in that order. Token
(r, c) of a tile reads patches 2r..2r+1 x 2c..2c+1 of the tower's grid: the pixel shuffle transposes twice and the
transposes cancel, so the layout's (row, col) lay over the patch grid as they are.

The language model is Qwen2 (Llama-style layers with GQA and q/k/v biases, rotate-half RoPE, 2-D position ids):
the default probe and kwargs gathering of `ModelAdapter` fit it as they are. Module paths are LLaVA's
(`.model.language_model`, `.model.vision_tower`). The remote-code checkpoints (`model_type` "internvl_chat",
`InternVLChatModel`) have another layout and are refused: use the "-hf" conversions.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import ComposedVLMAdapter, ImageGrid, Panel, TokenCell

__all__ = ["InternVLAdapter"]


class InternVLAdapter(ComposedVLMAdapter):
    model_types = ("internvl",)
    expects = "InternVLForConditionalGeneration"

    def __init__(self, model: nn.Module):
        super().__init__(model)
        if getattr(model.config, "image_token_id", None) is None:
            raise TypeError("internvl config has no image_token_id; cannot locate the vision tokens")

    def wrong_type_hint(self, model_type: str | None) -> str:
        if model_type == "internvl_chat":
            return (" (the remote-code InternVLChatModel: load the \"-hf\" checkpoint with "
                    "InternVLForConditionalGeneration)")
        return ""

    def vision_token_ids(self) -> tuple[int, ...]:
        """The `<IMG_CONTEXT>` id only: `<img>` / `</img>` are text."""
        return (int(self.model.config.image_token_id),)

    def tile_side(self) -> tuple[int, int]:
        """(rows, cols) of tokens per tile after the pixel shuffle."""
        config = self.model.config
        vision = config.vision_config
        size, patch = (_pair(vision.image_size), _pair(vision.patch_size))
        ratio = config.downsample_ratio
        return int(size[0] // patch[0] * ratio), int(size[1] // patch[1] * ratio)

    def token_layout(self, inputs: dict) -> tuple[list[TokenCell], list[ImageGrid]]:
        """Crops (panels 1 .. n, row-major) then the thumbnail (panel 0) of each image of the first prompt, every
        tile's tokens row-major; needs `image_sizes` (N, 2) of the original (height, width) of each image
        (ValueError without), because the overlays draw the crops where they are in the image."""
        if inputs.get("image_sizes") is None:
            raise ValueError("InternVL's crop grid is not in the processor outputs: the layout needs `image_sizes` "
                             "(N, 2), the original (height, width) of each image (mmreduce.demo.compare."
                             "prepare_inputs adds it)")
        return self._tile_layout(inputs, inputs["input_ids"][:1])

    def batch_token_layout(self, inputs: dict) -> tuple[list[TokenCell], list[ImageGrid]]:
        """`token_layout` of every prompt of the batch (images numbered across it), without needing `image_sizes`:
        the stock processor does not return it, and a tile's tokens are a fixed-size run of context tokens whatever
        the crop grid. Without `image_sizes`, crop k of an image is panel k (1 .. n, in the processor's row-major
        order) with its (row, col) inside the tile, and the image's `ImageGrid.crops` is (0, 0): where a crop lies
        in the image is unknown (its pixels are still `panels[k]`). With `image_sizes`, as `token_layout`."""
        return self._tile_layout(inputs, inputs["input_ids"])

    def _tile_layout(self, inputs: dict, prompts: torch.Tensor) -> tuple[list[TokenCell], list[ImageGrid]]:
        """The layout of `prompts` (B, T) (the first rows of `inputs["input_ids"]`); their tiles are the first rows
        of `pixel_values`, prompt after prompt, image after image."""
        from transformers.models.got_ocr2.image_processing_got_ocr2 import get_optimal_tiled_canvas

        if inputs.get("pixel_values_videos") is not None:
            raise NotImplementedError("InternVLAdapter has no token layout for video inputs (pixel_values_videos); "
                                      "pass the frames as images")
        rows, cols = self.tile_side()
        per_tile = rows * cols
        whole = prompts.shape[0] == inputs["input_ids"].shape[0]  # every prompt of the inputs, so every tile
        context = prompts == int(self.model.config.image_token_id)  # (B, T)
        if inputs.get("attention_mask") is not None:
            context &= inputs["attention_mask"][:prompts.shape[0]].bool()
        runs = [length for row in context for length in _runs(row)]  # context tokens of each image, in order
        sizes = inputs.get("image_sizes")
        if sizes is not None:
            sizes = [tuple(int(v) for v in size) for size in torch.as_tensor(sizes).view(-1, 2).tolist()]
            if len(sizes) < len(runs) or (whole and len(sizes) != len(runs)):
                raise ValueError(f"the prompts hold {len(runs)} images but image_sizes has {len(sizes)}")
        tile_px = _pair(self.model.config.vision_config.image_size)
        grid_cells = [(r, c) for r in range(rows) for c in range(cols)]
        square = rows if rows == cols else 0
        cells: list[TokenCell] = []
        grids: list[ImageGrid] = []
        offset = 0  # first pixel_values row of the image
        for image, length in enumerate(runs):
            if length % per_tile:
                raise ValueError(f"image {image} has {length} context tokens, not a multiple of {per_tile} per tile")
            tiles = length // per_tile
            if tiles == 1:
                cells += [TokenCell(image, 0, r, c) for r, c in grid_cells]
                grids.append(ImageGrid((0, 0), square, (Panel(rows, cols, index=(offset,)),)))
                offset += 1
                continue
            crops = tiles - 1
            crop_grid = (0, 0)  # unknown without the image's size
            if sizes is not None:
                size = sizes[image]
                # GotOcr2's canvas choice among the grids of exactly `crops` tiles: the same as its choice among all
                # grids of min..max tiles whenever that choice had `crops` tiles (ties break the same way).
                grid_cols, grid_rows = get_optimal_tiled_canvas(size, tile_px, crops, crops)
                if grid_cols * grid_rows != crops:
                    raise ValueError(f"image {image} ({size[1]}x{size[0]} px) has {crops} crops, which no tile grid "
                                     "of the image processor gives")
                crop_grid = (grid_rows, grid_cols)
            for crop in range(crops):
                cells += [TokenCell(image, 1 + crop, r, c) for r, c in grid_cells]
            cells += [TokenCell(image, 0, r, c) for r, c in grid_cells]
            panels = [Panel(rows, cols, index=(offset + crops,))]  # the thumbnail, after the crops
            panels += [Panel(rows, cols, index=(offset + crop,)) for crop in range(crops)]
            grids.append(ImageGrid(crop_grid, square, tuple(panels)))
            offset += tiles
        if whole and "pixel_values" in inputs and offset != inputs["pixel_values"].shape[0]:
            raise ValueError(f"the prompts' context tokens make {offset} tiles but pixel_values holds "
                             f"{inputs['pixel_values'].shape[0]}")
        return cells, grids


def _pair(value) -> tuple[int, int]:
    return (int(value[0]), int(value[1])) if isinstance(value, (list, tuple)) else (int(value), int(value))


def _runs(mask: torch.Tensor) -> list[int]:
    """Lengths of the runs of True in a 1-D bool mask, in order."""
    lengths, current = [], 0
    for flag in mask.tolist():
        if flag:
            current += 1
        elif current:
            lengths.append(current)
            current = 0
    if current:
        lengths.append(current)
    return lengths
