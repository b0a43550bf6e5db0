"""The oracle selection: an UPPER REFERENCE for comparisons, not a method.

`OracleKeep` keeps the vision tokens that lie under the objects the question asks about first (the benchmark's
`Sample.meta["target_boxes"]`, pixel boxes of the original image), then fills the rest of the budget with a seeded
random draw. It reads where the answer is, which no method can, so its accuracy is what a perfect token selection at
that budget could reach on this model: a ceiling to read the methods against. It is deliberately not registered
(`mmreduce.list_methods()` does not list it); the harness adds it with `mmreduce bench --oracle`, and a runner hands
it each batch's samples through `bind` before generating.

Where a token lies in the original image (`token_boxes`), per panel of the family's token layout:
- panel 0 (LLaVA-1.5's image, LLaVA-NeXT's base image, InternVL's thumbnail, a Qwen2-VL image) is the whole image,
  its token grid laid evenly over it. Exact for the processors that resize the whole image to the panel (LLaVA-NeXT's
  base view, InternVL's thumbnail, Qwen2-VL); LLaVA-1.5's CLIP processor instead resizes the short side and
  centre-crops, so for a non-square image the tokens near the long sides are placed off by the crop (the bundled
  benchmarks' LLaVA-1.5 images are square, where it is exact);
- crop k >= 1 of a `crops` = (rows, cols) grid (row-major) covers a tile of a canvas of rows x cols tiles. How the
  image sits on that canvas is the family's: "letterbox" (LLaVA-NeXT: resized to fit the pinpoint with its aspect
  ratio kept, the long side filling it and the short side rounded up, then centred with zero padding, as
  transformers' LlavaNextImageProcessor does; tokens over the padding cover no pixels), or "stretch" (InternVL's
  GotOcr2 tiling: resized to the canvas exactly). Other families' crops, and videos laid out as temporal slices,
  are refused.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from mmreduce.methods.base import check_ratio
from mmreduce.methods.before import BeforeLLMMethod, TokenPlan, VisionTokens, keep_count

__all__ = ["CROP_CANVAS", "OracleKeep", "boxes_overlap", "oracle_keep_ratio", "token_boxes"]

#: How each family's processor lays an image on its crop canvas (see the module docstring).
CROP_CANVAS = {"llava_next": "letterbox", "internvl": "stretch"}


def _crop_to_image(canvas_rect: tuple[float, float, float, float], size: tuple[int, int], crops: tuple[int, int],
                   canvas: str, tile_px: int | None) -> tuple[float, float, float, float]:
    """A rectangle (x0, y0, x1, y1) on the crop canvas -> the same rectangle in original-image pixels (clipped to the
    image; zero area when it lies on padding). Canvas units: one tile is `tile_px` pixels (1 for "stretch")."""
    height, width = size
    unit = tile_px if tile_px is not None else 1
    canvas_w, canvas_h = crops[1] * unit, crops[0] * unit
    x0, y0, x1, y1 = canvas_rect
    if canvas == "stretch":
        sx, sy, pad_x, pad_y = width / canvas_w, height / canvas_h, 0, 0
    else:  # letterbox: transformers' get_patch_output_size (ceil on the short side) and centred padding (floor)
        if canvas_w / width < canvas_h / height:
            new_w, new_h = canvas_w, min(math.ceil(height * canvas_w / width), canvas_h)
        else:
            new_w, new_h = min(math.ceil(width * canvas_h / height), canvas_w), canvas_h
        pad_x, pad_y = (canvas_w - new_w) // 2, (canvas_h - new_h) // 2
        sx, sy = width / new_w, height / new_h
    return (_clip((x0 - pad_x) * sx, width), _clip((y0 - pad_y) * sy, height),
            _clip((x1 - pad_x) * sx, width), _clip((y1 - pad_y) * sy, height))


def _clip(value: float, high: int) -> float:
    return min(max(value, 0.0), float(high))


def token_boxes(cells: Sequence, grids: Sequence, image_sizes: Sequence[tuple[int, int]], *,
                canvas: str | None = None, tile_px: int | None = None) -> torch.Tensor:
    """The pixel rectangle of the original image that each vision token covers.

    Args:
        cells: n `TokenCell`s (image, panel, row, col), as `adapter.batch_token_layout` gives them.
        grids: per image, its `ImageGrid` (panel token grids, `crops` (rows, cols) of the crop grid).
        image_sizes: per image, its original (height, width) in pixels (transformers' `image_sizes` order).
        canvas: how crops lie on the image ("letterbox" or "stretch", see the module docstring); None refuses crops.
        tile_px: the crop's side in processor pixels (the vision tower's input size); "letterbox" needs it, since
            the processor rounds the resized image to whole pixels.

    Returns:
        (n, 4) float64 (x0, y0, x1, y1), x1/y1 exclusive, in original-image pixels; NaN for tokens that cover no
        pixels (newline and end-of-panel tokens, negative panels).
    """
    if canvas not in (None, "letterbox", "stretch"):
        raise ValueError(f"canvas must be 'letterbox', 'stretch' or None, got {canvas!r}")
    if canvas == "letterbox" and tile_px is None:
        raise ValueError("canvas='letterbox' needs tile_px, the crop's side in processor pixels (the vision tower's "
                         "image_size): the processor rounds the resized image to whole pixels")
    out = torch.full((len(cells), 4), float("nan"), dtype=torch.float64)
    for index, cell in enumerate(cells):
        if cell.panel < 0:
            continue
        if not 0 <= cell.image < min(len(grids), len(image_sizes)):
            raise ValueError(f"token {index} belongs to image {cell.image}, but only {len(grids)} grids and "
                             f"{len(image_sizes)} image sizes were given (one of each per image of the batch)")
        grid, (height, width) = grids[cell.image], image_sizes[cell.image]
        if grid.frames:
            raise ValueError(f"image {cell.image} is a video laid out in {grid.frames} temporal slices; the oracle "
                             "has one set of boxes per image, so pass the frames as images")
        panels = grid.panel_list(cell.image)
        panel = panels[cell.panel]  # (rows, cols) token grid over the panel's picture
        if cell.panel == 0:
            sx, sy = width / panel.cols, height / panel.rows
            out[index] = torch.tensor([cell.col * sx, cell.row * sy, (cell.col + 1) * sx, (cell.row + 1) * sy])
            continue
        rows, cols = grid.crops
        if canvas is None:
            raise ValueError(f"image {cell.image} has crops (panel {cell.panel}), but where this family's processor "
                             "puts them in the image is not known to the oracle (known: "
                             f"{', '.join(sorted(CROP_CANVAS))})")
        if rows * cols == 0 or cell.panel > rows * cols:
            raise ValueError(f"image {cell.image}: crop panel {cell.panel} is not in its crop grid {grid.crops}; the "
                             "layout needs the crop grid (InternVL: pass image_sizes with the inputs)")
        crop_row, crop_col = divmod(cell.panel - 1, cols)
        unit = tile_px if tile_px is not None else 1
        cw, ch = unit / panel.cols, unit / panel.rows  # one token's cell on the canvas
        x0, y0 = crop_col * unit + cell.col * cw, crop_row * unit + cell.row * ch
        out[index] = torch.tensor(_crop_to_image((x0, y0, x0 + cw, y0 + ch), (height, width), (rows, cols), canvas,
                                                 tile_px))
    return out


def boxes_overlap(rects: torch.Tensor, boxes: Sequence[tuple[int, int, int, int]]) -> torch.Tensor:
    """(n,) bool: which of the (n, 4) token rectangles (x1, y1 exclusive) overlap any of `boxes`, inclusive pixel
    boxes (x0, y0, x1, y1) as the benchmarks give them (pixel x1 is inside, so the box spans [x0, x1 + 1)). A token
    of zero area (on padding) or NaN (no pixels) overlaps nothing."""
    hit = torch.zeros(rects.shape[0], dtype=torch.bool)
    area = (rects[:, 2] > rects[:, 0]) & (rects[:, 3] > rects[:, 1])  # False for NaN too
    for x0, y0, x1, y1 in boxes:
        hit |= (rects[:, 0] < x1 + 1) & (rects[:, 2] > x0) & (rects[:, 1] < y1 + 1) & (rects[:, 3] > y0)
    return hit & area


def oracle_keep_ratio(budget: float, vision_tokens: int) -> float:
    """The keep ratio at which the oracle keeps as many tokens as an `equivalent=budget` before-the-LLM method does
    on `vision_tokens` tokens: the largest count within the budget (`budget` <= 1 a fraction, > 1 a count)."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not budget > 0 or math.isnan(budget):
        raise ValueError(f"an oracle budget must be a fraction in (0, 1] or a token count > 1, got {budget!r}")
    if vision_tokens < 1:
        raise ValueError(f"the oracle needs at least one vision token per prompt, got {vision_tokens}")
    target = budget * vision_tokens if budget <= 1 else budget
    count = min(vision_tokens, max(1, math.floor(target + 1e-9)))
    return count / vision_tokens


@dataclass
class OracleKeep(BeforeLLMMethod):
    """Keep the tokens under the asked objects first, then a seeded random draw, ⌈keep_ratio·n⌉ of each sample's n
    pixel tokens; merge nothing. An upper reference (it reads the answer's location), not a method.

    Call `bind(samples, inputs, adapter)` before each batch (the harness's runner does): the boxes come from the
    samples, the crop grids from the adapter's layout of the processor outputs.

    Parameters:
        keep_ratio: r in (0, 1].
        seed: base seed of the fill draw (mixed with each sample's own prompt tokens).
    """

    keep_ratio: float = 0.25
    seed: int = 0

    name: ClassVar[str] = "oracle"
    needs_layout = True

    def __post_init__(self):
        check_ratio("OracleKeep", "keep_ratio", self.keep_ratio)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"OracleKeep.seed must be an integer, got {self.seed!r}")
        self._boxes: list[list[tuple[int, int, int, int]]] | None = None
        self._grids: list | None = None
        self._sizes: list[tuple[int, int]] = []
        self._canvas: str | None = None
        self._tile_px: int | None = None

    @classmethod
    def example(cls, num_layers: int, keep_all: bool = False) -> "OracleKeep":
        return cls(keep_ratio=1.0 if keep_all else 0.25)

    def bind(self, samples: Sequence, inputs: dict, adapter) -> None:
        """Reads the target boxes and image sizes of a batch's `samples` (one entry per image of the prompts, in
        order: a video clip's frames have their own boxes) and the crop grids from `adapter`'s layout of `inputs`
        (the processor outputs of that batch). Raises ValueError, binding nothing, when a sample has no boxes."""
        from .testbed.grounding import is_clip, video_frames

        boxes, sizes = [], []
        for number, sample in enumerate(samples):
            scenes = video_frames(sample) if is_clip(sample) else [sample]
            if len(scenes) != len(sample.images):
                raise ValueError(f"sample {number} shows {len(sample.images)} images but its target_boxes describe "
                                 "one; the oracle needs boxes per image (a video clip's frames have them)")
            for scene, image in zip(scenes, sample.images):
                if "target_boxes" not in scene.meta:
                    raise ValueError(f"sample {number} has no meta['target_boxes']; the oracle needs the boxes of "
                                     "the asked objects (the bundled benchmarks shapes, docs and video have them)")
                boxes.append([tuple(int(v) for v in box) for box in scene.meta["target_boxes"]])
                sizes.append((image.height, image.width))
        layout_inputs = dict(inputs)
        if layout_inputs.get("image_sizes") is None:  # InternVL's crop grid comes from the original sizes
            layout_inputs["image_sizes"] = torch.tensor(sizes, dtype=torch.long)
        _, grids = adapter.batch_token_layout(layout_inputs)
        if len(grids) != len(boxes):
            raise ValueError(f"the prompts lay out {len(grids)} images but the samples show {len(boxes)}")
        config = adapter.model.config
        tile = getattr(getattr(config, "vision_config", None), "image_size", None)
        self._boxes, self._grids, self._sizes = boxes, list(grids), sizes
        self._canvas = CROP_CANVAS.get(config.model_type)
        self._tile_px = int(tile[0] if isinstance(tile, (list, tuple)) else tile) if tile is not None else None

    def targets(self, cells: Sequence) -> torch.Tensor:
        """(n,) bool: the tokens of `cells` that overlap a target box of their image."""
        if self._boxes is None:
            raise ValueError("OracleKeep is not bound to a batch: call bind(samples, inputs, adapter) before "
                             "generating (mmreduce bench's runner does)")
        rects = token_boxes(cells, self._grids, self._sizes, canvas=self._canvas, tile_px=self._tile_px)  # (n, 4)
        hit = torch.zeros(len(cells), dtype=torch.bool)
        for image in {cell.image for cell in cells}:
            members = torch.tensor([cell.image == image for cell in cells])
            hit[members] = boxes_overlap(rects[members], self._boxes[image])
        return hit

    def plan(self, tokens: VisionTokens) -> TokenPlan:
        if tokens.cells is None:
            raise ValueError("OracleKeep needs the token layout of the images (the adapter gave none)")
        under = self.targets(tokens.cells)  # (n,)
        generator = torch.Generator().manual_seed((self.seed * 1_000_003 + tokens.seed) % (2**63 - 1))
        # Targets rank above every other token (1 + U[0,1) > U[0,1)); the draw orders each group at random.
        scores = under.double() + torch.rand(tokens.count, generator=generator, dtype=torch.float64)  # (n,)
        chosen = scores.topk(keep_count(self.keep_ratio, tokens.count)).indices
        keep = torch.zeros(tokens.count, dtype=torch.bool)
        keep[chosen] = True
        return TokenPlan.select(keep)
