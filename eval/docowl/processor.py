"""DocOwl 1.5's shape-adaptive cropping (`DocProcessor`): anchor choice, crops, and the prompt with crop indicators.

A page is resized to the anchor grid (rows x cols crops of `image_size`) that fits its shape best: the anchors are all
grids with rows * cols <= 9 (`grid_9`); each is scored 100 * shape-IoU + IoU, where the IoU compares the anchor's box
with the page's box (resolution fit) and the shape-IoU compares the anchor's box with a box of the anchor's width and
the page's aspect ratio (shape fit, resolution-free). The global image (the whole page at `image_size`) comes first,
then the crops row by row; each is one `<|image|>` placeholder in the prompt, preceded by a plain-text indicator when
`add_textual_crop_indicator` is set: `<global_img><|image|><crop_img_row0_col0><|image|><crop_img_row0_col1>...`.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

__all__ = ["DocProcessor", "GRID_9", "MEDIA_TOKEN", "anchor_grids", "select_anchor"]

MEDIA_TOKEN = "<|image|>"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def anchor_grids(max_crops: int) -> list[tuple[int, int]]:
    """Every (rows, cols) with rows * cols <= max_crops, fewer crops first (then fewer rows): ties of the score go to
    the earlier grid."""
    grids = [(r, c) for r in range(1, max_crops + 1) for c in range(1, max_crops + 1) if r * c <= max_crops]
    return sorted(grids, key=lambda g: (g[0] * g[1], g[0]))


GRID_9 = anchor_grids(9)


def _iou(width_a: float, height_a: float, width_b: float, height_b: float) -> float:
    """IoU of two boxes anchored at the origin."""
    inter = min(width_a, width_b) * min(height_a, height_b)
    return inter / (width_a * height_a + width_b * height_b - inter)


def select_anchor(height: int, width: int, anchors=GRID_9, image_size: int = 448) -> tuple[int, int]:
    """The (rows, cols) grid for a `height` x `width` page: best shape-IoU first, then best IoU."""

    def score(grid):
        rows, cols = grid
        anchor_w, anchor_h = cols * image_size, rows * image_size
        shape_iou = _iou(anchor_w, anchor_h, anchor_w, anchor_w * height / width)
        return 100 * shape_iou + _iou(anchor_w, anchor_h, width, height)

    scores = [score(grid) for grid in anchors]
    return anchors[int(np.argmax(scores))]


class DocProcessor:
    """Pages -> (pixel_values (N, 3, S, S), patch_positions (N, 2), prompt text), as DocOwl 1.5's processor.

    `patch_positions` holds (row, col) of each crop and (9, 9) (the largest anchor side) for the global image.
    """

    def __init__(self, image_size: int = 448, anchors: str = "grid_9", add_global_img: bool = True,
                 add_textual_crop_indicator: bool = True):
        if anchors != "grid_9":
            raise ValueError(f"only the 'grid_9' anchors are implemented, got {anchors!r}")
        self.image_size = image_size
        self.anchors = GRID_9
        self.anchor_max = max(max(grid) for grid in self.anchors)
        self.add_global_img = add_global_img
        self.add_textual_crop_indicator = add_textual_crop_indicator

    def anchor(self, image: Image.Image) -> tuple[int, int]:
        return select_anchor(image.height, image.width, self.anchors, self.image_size)

    def _to_tensor(self, image: Image.Image, height: int, width: int) -> torch.Tensor:
        array = np.asarray(image.resize((width, height), Image.BICUBIC), dtype=np.float32) / 255.0
        array = (array - np.array(CLIP_MEAN, dtype=np.float32)) / np.array(CLIP_STD, dtype=np.float32)
        return torch.from_numpy(array).permute(2, 0, 1).contiguous()  # (3, H, W)

    def process_image(self, image: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        """One page -> (panels (1 + rows * cols, 3, S, S), global first; positions (1 + rows * cols, 2))."""
        image = image.convert("RGB")
        size = self.image_size
        rows, cols = self.anchor(image)
        page = self._to_tensor(image, rows * size, cols * size)  # (3, rows*S, cols*S)
        crops = page.view(3, rows, size, cols, size).permute(1, 3, 0, 2, 4).reshape(rows * cols, 3, size, size)
        positions = torch.tensor([(r, c) for r in range(rows) for c in range(cols)], dtype=torch.long)
        if self.add_global_img:
            crops = torch.cat([self._to_tensor(image, size, size)[None], crops])
            positions = torch.cat([torch.full((1, 2), self.anchor_max, dtype=torch.long), positions])
        return crops, positions

    def placeholders(self, positions: torch.Tensor) -> str:
        """The prompt text standing for one page whose panels have `positions`."""
        if not self.add_textual_crop_indicator:
            return MEDIA_TOKEN * positions.shape[0]
        parts = []
        for row, col in positions.tolist():
            is_global = row == self.anchor_max and col == self.anchor_max
            parts.append(("<global_img>" if is_global else f"<crop_img_row{row}_col{col}>") + MEDIA_TOKEN)
        return "".join(parts)

    def __call__(self, images, query: str) -> tuple[torch.Tensor, torch.Tensor, str]:
        """`query` holds one `<|image|>` per page; each becomes the page's placeholders (`placeholders`)."""
        images = images if isinstance(images, (list, tuple)) else [images]
        pieces = query.split(MEDIA_TOKEN)
        if len(pieces) - 1 != len(images):
            raise ValueError(f"the query has {len(pieces) - 1} {MEDIA_TOKEN} for {len(images)} images")
        pixels, positions, text = [], [], pieces[0]
        for image, after in zip(images, pieces[1:]):
            panels, where = self.process_image(image)
            pixels.append(panels)
            positions.append(where)
            text += self.placeholders(where) + after
        return torch.cat(pixels), torch.cat(positions), text
