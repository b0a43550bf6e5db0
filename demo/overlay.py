"""Pictures of the kept vision tokens per drop stage.

Which patch of which image (and which crop) each vision token is comes from the model family's adapter
(`ModelAdapter.token_layout`). Panels are drawn from `pixel_values`, i.e. exactly the pixels the model saw (base
image and each crop).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw

from mmreduce.adapters.base import NEWLINE, ImageGrid, TokenCell

__all__ = ["NEWLINE", "TokenCell", "draw_kept_tokens"]

_PANEL_MIN = 160  # panels are upscaled to at least this many pixels so that 4x4 crops stay visible
_GAP = 6
_DROPPED = (20, 20, 28)


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


def _compose(image_panels, grid: ImageGrid, cells: list[TokenCell], kept: list[bool]) -> Image.Image:
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


def draw_kept_tokens(adapter, processor, inputs: dict, positions: list[int], kept_positions: dict[int, list[int]],
                     label: str) -> list[tuple[Image.Image, str]]:
    """One picture per drop stage: every image (and crop) with the tokens that do not reach that layer darkened.

    `positions` are the indices of the vision tokens in `input_ids`; `kept_positions` maps a drop layer to the
    indices kept (as in `ReductionStats.kept_positions` for one sample).
    """
    if not kept_positions:
        return []
    try:
        cells, grids = adapter.token_layout(inputs)
    except NotImplementedError as error:
        raise ValueError(f"cannot draw kept tokens for this model: {error}") from None
    if len(cells) != len(positions):
        raise ValueError(f"the prompt has {len(positions)} vision tokens but {type(adapter).__name__}'s layout gives "
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
