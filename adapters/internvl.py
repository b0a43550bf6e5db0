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
`pixel_values` rows in prompt order (each image's crops, then its thumbnail).

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
        """Crops (panels 1 .. n, row-major) then the thumbnail (panel 0) of each image, every tile's tokens
        row-major; needs `image_sizes` (N, 2) of the original (height, width) of each image (ValueError without)."""
        from transformers.models.got_ocr2.image_processing_got_ocr2 import get_optimal_tiled_canvas

        if inputs.get("pixel_values_videos") is not None:
            raise NotImplementedError("InternVLAdapter has no token layout for video inputs (pixel_values_videos); "
                                      "pass the frames as images")
        sizes = inputs.get("image_sizes")
        if sizes is None:
            raise ValueError("InternVL's crop grid is not in the processor outputs: the layout needs `image_sizes` "
                             "(N, 2), the original (height, width) of each image (mmreduce.demo.compare."
                             "prepare_inputs adds it)")
        rows, cols = self.tile_side()
        per_tile = rows * cols
        runs = _runs(inputs["input_ids"][0] == int(self.model.config.image_token_id))
        sizes = [tuple(int(v) for v in size) for size in torch.as_tensor(sizes).view(-1, 2).tolist()]
        if len(runs) != len(sizes):
            raise ValueError(f"the prompt holds {len(runs)} images but image_sizes has {len(sizes)}")
        tile_px = _pair(self.model.config.vision_config.image_size)
        cells: list[TokenCell] = []
        grids: list[ImageGrid] = []
        offset = 0  # first pixel_values row of the image
        for image, (length, size) in enumerate(zip(runs, sizes)):
            if length % per_tile:
                raise ValueError(f"image {image} has {length} context tokens, not a multiple of {per_tile} per tile")
            tiles = length // per_tile
            grid_cells = [(r, c) for r in range(rows) for c in range(cols)]
            if tiles == 1:
                cells += [TokenCell(image, 0, r, c) for r, c in grid_cells]
                grids.append(ImageGrid((0, 0), rows if rows == cols else 0, (Panel(rows, cols, index=(offset,)),)))
                offset += 1
                continue
            crops = tiles - 1
            # GotOcr2's canvas choice among the grids of exactly `crops` tiles: the same as its choice among all
            # grids of min..max tiles whenever that choice had `crops` tiles (ties break the same way).
            grid_cols, grid_rows = get_optimal_tiled_canvas(size, tile_px, crops, crops)
            if grid_cols * grid_rows != crops:
                raise ValueError(f"image {image} ({size[1]}x{size[0]} px) has {crops} crops, which no tile grid of "
                                 "the image processor gives")
            for crop in range(crops):
                cells += [TokenCell(image, 1 + crop, r, c) for r, c in grid_cells]
            cells += [TokenCell(image, 0, r, c) for r, c in grid_cells]
            panels = [Panel(rows, cols, index=(offset + crops,))]  # the thumbnail, after the crops
            panels += [Panel(rows, cols, index=(offset + crop,)) for crop in range(crops)]
            grids.append(ImageGrid((grid_rows, grid_cols), rows if rows == cols else 0, tuple(panels)))
            offset += tiles
        if "pixel_values" in inputs and offset != inputs["pixel_values"].shape[0]:
            raise ValueError(f"the prompt's context tokens make {offset} tiles but pixel_values holds "
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
