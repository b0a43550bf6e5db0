"""Pictures of the kept vision tokens per drop stage.

Which token-grid cell of which panel of which image each vision token is, and where each panel's pixels are in the
processor outputs, come from the model family's adapter (`ModelAdapter.token_layout`, `ImageGrid.panel_list`).
Panels are drawn from those pixels, i.e. exactly the pixels the model saw (base image, global image or thumbnail,
each crop or tile, each video slice), with each panel's token grid laid evenly over it.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from mmreduce.adapters.base import END_OF_PANEL, NEWLINE, ImageGrid, Panel, TokenCell
from PIL import Image, ImageDraw

__all__ = ["NEWLINE", "TokenCell", "draw_kept_tokens"]

_PANEL_MIN = 160  # panels are upscaled to at least this many pixels so that 4x4 crops stay visible
_GAP = 6
_DROPPED = (20, 20, 28)
_KEPT_MARK = (46, 160, 67)
_ABSENT_MARK = (180, 180, 180)


def _normalisation(processor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) (3, 1, 1) the processor normalised the pixels with."""
    image_processor = getattr(processor, "image_processor", None)
    if image_processor is None or getattr(image_processor, "image_mean", None) is None:
        image_processor = getattr(processor, "video_processor", processor)
    mean = torch.tensor(image_processor.image_mean, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(image_processor.image_std, dtype=torch.float32).view(3, 1, 1)
    return mean, std


def _panels(processor, inputs: dict, grids: list[ImageGrid]) -> list[list[Image.Image]]:
    """Per image, its panels (panel order) as RGB pictures (normalisation undone)."""
    mean, std = _normalisation(processor)
    pictures = []
    for image, grid in enumerate(grids):
        row = []
        for panel in grid.panel_list(image):
            pixels = panel.pixels(inputs).float().cpu()
            rgb = ((pixels * std + mean).clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
            row.append(Image.fromarray(np.ascontiguousarray(rgb)))
        pictures.append(row)
    return pictures


def _shade(panel: Image.Image, rows: int, cols: int, scale: int, kept: set[tuple[int, int]],
           present: set[tuple[int, int]]):
    """The panel upscaled, its `rows` x `cols` token grid laid over it: dropped cells darkened, cells without any
    token hatched grey."""
    big = panel.resize((panel.width * scale, panel.height * scale), Image.NEAREST).convert("RGBA")
    overlay = Image.new("RGBA", big.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    step_x, step_y = big.width // cols, big.height // rows
    for r in range(rows):
        for c in range(cols):
            box = (c * step_x, r * step_y, (c + 1) * step_x - 1, (r + 1) * step_y - 1)
            if (r, c) not in present:
                draw.rectangle(box, fill=(128, 128, 128, 150))
                draw.line((box[0], box[3], box[2], box[1]), fill=(90, 90, 90, 200))
            elif (r, c) not in kept:
                draw.rectangle(box, fill=(*_DROPPED, 205))
    return Image.alpha_composite(big, overlay).convert("RGB")


def _with_end_mark(picture: Image.Image, marker: int, state: bool | None) -> Image.Image:
    """`picture` with a strip below it holding the mark of the token that closes the panel (kept: green, dropped:
    dark, none: grey)."""
    out = Image.new("RGB", (picture.width, picture.height + marker), (255, 255, 255))
    out.paste(picture, (0, 0))
    fill = _ABSENT_MARK if state is None else (_KEPT_MARK if state else _DROPPED)
    ImageDraw.Draw(out).rectangle((0, picture.height + 1, min(picture.width, 4 * marker) - 1,
                                   picture.height + marker - 2), fill=fill)
    return out


def _compose(image_panels: list[Image.Image], grid: ImageGrid, cells: list[TokenCell], kept: list[bool],
             panels: tuple[Panel, ...] | None = None) -> Image.Image:
    """One image: panel 0 on the left and the crops in their grid beside it (newline marks right of the crops), or
    the frames of a video side by side, or panel 0 alone; tokens that close a panel get a strip below it."""
    panels = panels or grid.panel_list(0)
    by_panel: dict[int, tuple[set, set]] = {}
    newlines: list[tuple[int, bool]] = []
    ends: dict[int, bool] = {}
    for cell, keep in zip(cells, kept):
        if cell.panel == NEWLINE:
            newlines.append((cell.row, keep))
            continue
        if cell.panel == END_OF_PANEL:
            ends[cell.row] = keep
            continue
        present, chosen = by_panel.setdefault(cell.panel, (set(), set()))
        present.add((cell.row, cell.col))
        if keep:
            chosen.add((cell.row, cell.col))
    size = max(image_panels[0].width, image_panels[0].height)
    scale = max(1, math.ceil(_PANEL_MIN / size))
    marker = max(4, size * scale // max(panels[0].rows, panels[0].cols) // 2)

    def shaded(index: int) -> Image.Image:
        present, chosen = by_panel.get(index, (set(), set()))
        picture = _shade(image_panels[index], panels[index].rows, panels[index].cols, scale, chosen, present)
        return _with_end_mark(picture, marker, ends.get(index)) if ends else picture

    if grid.frames:
        return _tile([shaded(frame) for frame in range(grid.frames)])
    rows, cols = grid.crops
    if rows == 0:
        return shaded(0)
    base = shaded(0)
    crops = [shaded(1 + crop) for crop in range(rows * cols)]
    crop_w = max(picture.width for picture in crops)
    crop_h = max(picture.height for picture in crops)
    left = base.width + 2 * _GAP
    width = left + cols * crop_w + (cols - 1) + ((_GAP + marker) if newlines else 0)
    height = max(base.height, rows * crop_h + (rows - 1))
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    canvas.paste(base, (0, 0))
    for crop, picture in enumerate(crops):
        r, c = divmod(crop, cols)
        canvas.paste(picture, (left + c * (crop_w + 1), r * (crop_h + 1)))
    draw = ImageDraw.Draw(canvas)
    token_rows = panels[1].rows
    step = image_panels[1].height * scale // token_rows
    x = left + cols * (crop_w + 1) + _GAP - 1
    for feature_row, keep in newlines:  # the newline tokens, beside the feature row each one ends
        y = (feature_row // token_rows) * (crop_h + 1) + (feature_row % token_rows) * step
        draw.rectangle((x, y + 1, x + marker - 1, y + step - 2), fill=_KEPT_MARK if keep else _DROPPED)
    return canvas


def draw_kept_tokens(adapter, processor, inputs: dict, positions: list[int], kept_positions: dict[int, list[int]],
                     label: str) -> list[tuple[Image.Image, str]]:
    """One picture per drop stage: every image (and crop) with the tokens that do not reach that layer darkened.

    `positions` are the indices of the vision tokens in `input_ids` (in the text model's prompt for a family that
    expands placeholders first), one per cell of the adapter's layout; `kept_positions` maps a drop layer to the
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
    panels = _panels(processor, inputs, grids)
    pictures = []
    for layer, kept in sorted(kept_positions.items()):
        chosen = set(kept)
        flags = [p in chosen for p in positions]
        parts = []
        for image, grid in enumerate(grids):
            mine = [i for i, cell in enumerate(cells) if cell.image == image]
            parts.append(_compose(panels[image], grid, [cells[i] for i in mine], [flags[i] for i in mine],
                                  grid.panel_list(image)))
        picture = _tile(parts)
        pictures.append((picture, f"{label}: layer {layer} keeps {len(chosen)}/{len(positions)} vision tokens"))
    return pictures


def _tile(parts: list[Image.Image], columns: int = 2) -> Image.Image:
    """Two images side by side; more (a clip's frames) in rows of `columns`, so that each frame stays large in a
    method's column."""
    if len(parts) <= 2:
        return _hstack(parts)
    rows = [_hstack(parts[i:i + columns]) for i in range(0, len(parts), columns)]
    width = max(row.width for row in rows)
    canvas = Image.new("RGB", (width, sum(row.height for row in rows) + _GAP * (len(rows) - 1)), (255, 255, 255))
    y = 0
    for row in rows:
        canvas.paste(row, (0, y))
        y += row.height + _GAP
    return canvas


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
