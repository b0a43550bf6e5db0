"""Which patch of which image (and which crop) each vision token is, and pictures of the kept ones per drop stage.

The layout follows the models' own packing, derived from `model.config` and the processor outputs:
- LLaVA-1.5: image i's tokens are its (S/p)^2 patches in row-major order (CLS dropped).
- LLaVA-NeXT (anyres): the base image's patches, then the crops' patches as one big feature map (crops row by
  row), unpadded to the image's aspect ratio, each feature row followed by one newline token. Unpadding is
  taken from transformers itself (`unpad_image` applied to a map of cell indices), so it cannot drift.
Panels are drawn from `pixel_values`, i.e. exactly the pixels the model saw (base image and each crop).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw

__all__ = ["TokenCell", "draw_kept_tokens", "token_layout"]

NEWLINE = -1  # `TokenCell.panel` of a newline token
_PANEL_MIN = 160  # panels are upscaled to at least this many pixels so that 4x4 crops stay visible
_GAP = 6
_DROPPED = (20, 20, 28)


@dataclass(frozen=True)
class TokenCell:
    """One vision token: patch (row, col) of panel `panel` (0: the image or base image, k >= 1: crop k) of
    image `image`; a newline token has panel NEWLINE and `row` = the feature row it ends (padded grid)."""

    image: int
    panel: int
    row: int
    col: int


@dataclass(frozen=True)
class _ImageGrid:
    crops: tuple[int, int]  # (rows, cols) of crops; (0, 0) for a single panel
    side: int  # patches per panel side


def token_layout(config, inputs: dict) -> tuple[list[TokenCell], list[_ImageGrid]]:
    """Every vision token of the prompt in `input_ids` order, and each image's crop grid.

    Raises ValueError for a model type whose packing is not known here.
    """
    vision = config.vision_config
    side = vision.image_size // vision.patch_size
    pixel_values = inputs["pixel_values"]
    cells: list[TokenCell] = []
    grids: list[_ImageGrid] = []
    if config.model_type == "llava":
        for image in range(pixel_values.shape[0]):
            cells += [TokenCell(image, 0, r, c) for r in range(side) for c in range(side)]
            grids.append(_ImageGrid((0, 0), side))
        return cells, grids
    if config.model_type != "llava_next":
        raise ValueError(f"no token layout for model type {config.model_type!r} (known: llava, llava_next)")
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

    for image, size in enumerate(inputs["image_sizes"].tolist()):
        cells += [TokenCell(image, 0, r, c) for r in range(side) for c in range(side)]
        rows, cols = get_anyres_image_grid_shape(size, config.image_grid_pinpoints, vision.image_size)
        width = cols * side
        index = torch.arange(rows * side * width).view(1, rows * side, width)
        for feature_row in unpad_image(index, size)[0].tolist():
            for flat in feature_row:
                big_r, big_c = divmod(int(flat), width)
                crop = (big_r // side) * cols + big_c // side
                cells.append(TokenCell(image, 1 + crop, big_r % side, big_c % side))
            cells.append(TokenCell(image, NEWLINE, int(feature_row[0]) // width, -1))
        grids.append(_ImageGrid((rows, cols), side))
    return cells, grids


def _panels(processor, inputs: dict) -> list[list[Image.Image]]:
    """Per image, its panels as RGB pictures (normalisation undone)."""
    pixels = inputs["pixel_values"].float()
    if pixels.dim() == 4:
        pixels = pixels[:, None]  # llava: one panel per image
    image_processor = processor.image_processor
    mean = torch.tensor(image_processor.image_mean).view(1, 1, 3, 1, 1)
    std = torch.tensor(image_processor.image_std).view(1, 1, 3, 1, 1)
    rgb = ((pixels * std + mean).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 1, 3, 4, 2).numpy()
    return [[Image.fromarray(np.ascontiguousarray(panel)) for panel in image] for image in rgb]


def _shade(panel: Image.Image, side: int, scale: int, kept: set[tuple[int, int]], present: set[tuple[int, int]]):
    """The panel upscaled, with dropped patches darkened and patches without any token hatched grey."""
    big = panel.resize((panel.width * scale, panel.height * scale), Image.NEAREST).convert("RGBA")
    overlay = Image.new("RGBA", big.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    step = big.width // side
    for r in range(side):
        for c in range(side):
            box = (c * step, r * step, (c + 1) * step - 1, (r + 1) * step - 1)
            if (r, c) not in present:
                draw.rectangle(box, fill=(128, 128, 128, 150))
                draw.line((box[0], box[3], box[2], box[1]), fill=(90, 90, 90, 200))
            elif (r, c) not in kept:
                draw.rectangle(box, fill=(*_DROPPED, 205))
    return Image.alpha_composite(big, overlay).convert("RGB")


def _compose(image_panels, grid: _ImageGrid, cells: list[TokenCell], kept: list[bool]) -> Image.Image:
    by_panel: dict[int, tuple[set, set]] = {}
    newlines: list[tuple[int, bool]] = []
    for cell, keep in zip(cells, kept):
        if cell.panel == NEWLINE:
            newlines.append((cell.row, keep))
            continue
        present, chosen = by_panel.setdefault(cell.panel, (set(), set()))
        present.add((cell.row, cell.col))
        if keep:
            chosen.add((cell.row, cell.col))
    size = image_panels[0].width
    scale = max(1, math.ceil(_PANEL_MIN / size))
    panel_px = size * scale

    def shaded(index: int) -> Image.Image:
        present, chosen = by_panel.get(index, (set(), set()))
        return _shade(image_panels[index], grid.side, scale, chosen, present)

    rows, cols = grid.crops
    if rows == 0:
        return shaded(0)
    marker = max(4, panel_px // grid.side // 2)
    width = panel_px + 2 * _GAP + cols * panel_px + (cols - 1) + _GAP + marker
    height = max(panel_px, rows * panel_px + (rows - 1))
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    canvas.paste(shaded(0), (0, 0))
    left = panel_px + 2 * _GAP
    for crop in range(rows * cols):
        r, c = divmod(crop, cols)
        canvas.paste(shaded(1 + crop), (left + c * (panel_px + 1), r * (panel_px + 1)))
    draw = ImageDraw.Draw(canvas)
    step = panel_px // grid.side
    x = left + cols * (panel_px + 1) + _GAP - 1
    for feature_row, keep in newlines:  # the newline tokens, beside the feature row each one ends
        y = (feature_row // grid.side) * (panel_px + 1) + (feature_row % grid.side) * step
        draw.rectangle((x, y + 1, x + marker - 1, y + step - 2), fill=(46, 160, 67) if keep else _DROPPED)
    return canvas


def draw_kept_tokens(config, processor, inputs: dict, positions: list[int], kept_positions: dict[int, list[int]],
                     label: str) -> list[tuple[Image.Image, str]]:
    """One picture per drop stage: every image (and crop) with the tokens that do not reach that layer darkened.

    `positions` are the indices of the vision tokens in `input_ids`; `kept_positions` maps a drop layer to the
    indices kept (as in `ReductionStats.kept_positions` for one sample).
    """
    if not kept_positions:
        return []
    cells, grids = token_layout(config, inputs)
    if len(cells) != len(positions):
        raise ValueError(f"the prompt has {len(positions)} vision tokens but the {config.model_type} layout gives "
                         f"{len(cells)}; cannot draw kept tokens for this model")
    panels = _panels(processor, inputs)
    pictures = []
    for layer, kept in sorted(kept_positions.items()):
        chosen = set(kept)
        flags = [p in chosen for p in positions]
        parts = []
        for image, grid in enumerate(grids):
            mine = [i for i, cell in enumerate(cells) if cell.image == image]
            parts.append(_compose(panels[image], grid, [cells[i] for i in mine], [flags[i] for i in mine]))
        picture = _hstack(parts)
        pictures.append((picture, f"{label}: layer {layer} keeps {len(chosen)}/{len(positions)} vision tokens"))
    return pictures


def _hstack(parts: list[Image.Image]) -> Image.Image:
    if len(parts) == 1:
        return parts[0]
    width = sum(p.width for p in parts) + _GAP * (len(parts) - 1)
    canvas = Image.new("RGB", (width, max(p.height for p in parts)), (255, 255, 255))
    x = 0
    for part in parts:
        canvas.paste(part, (x, 0))
        x += part.width + _GAP
    return canvas
