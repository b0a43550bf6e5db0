"""`docs`: large, mostly empty page-like images with a few small fields, for cropping (anyres) models.

A page holds 2-4 fields, each a small coloured box with a seven-segment digit inside (black on light colours,
white on dark ones), plus a few grey "text line" bars as distractors. The fields sit in one or two small clusters, so most crops of the page are
empty paper and one or two crops hold all the information. Like form fields on a layout grid, each field lies inside
one cell of a 16 px grid (a small random offset within the cell), so that a 16 px patch sees a whole digit: a digit
cut across four patches could only be read by a vision tower much larger than the tiny ones trained here.

| qtype | question | answers |
|---|---|---|
| digit_of_color | what digit is in the {color} box ? | 0-9 |
| color_of_digit | what color is the box with the {digit} ? | the 6 colours |

Boxes have distinct colours and fields distinct digits within a page, so every question has one answer.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from .base import Sample, balanced_answer, sample_rng
from .draw import COLORS, boxes_overlap, draw_digit

__all__ = ["DocsConfig", "QTYPES", "make_docs_sample"]

QTYPES: tuple[str, ...] = ("digit_of_color", "color_of_digit")
DIGITS: tuple[str, ...] = tuple("0123456789")
ANSWERS: dict[str, tuple[str, ...]] = {"digit_of_color": DIGITS, "color_of_digit": tuple(COLORS)}

# Field geometry in pixels: a 12 x 16 box holding an 8 x 12 digit (2 px strokes) with a 2 px margin.
_DIGIT_W, _DIGIT_H, _STROKE, _MARGIN = 8, 12, 2, 2
_FIELD_W, _FIELD_H = _DIGIT_W + 2 * _MARGIN, _DIGIT_H + 2 * _MARGIN


@dataclass
class DocsConfig:
    """Generator settings.

    - page_sizes: the (width, height) page sizes to draw from (pick them equal to the model's anyres
      pinpoints, so the crops see the page without resampling).
    - min_fields, max_fields: fields per page.
    - max_lines: most grey text-line bars per page.
    - field_grid: each field lies inside one cell of a grid this many pixels wide (match the model's patch size);
      0 places fields anywhere.
    """

    page_sizes: tuple[tuple[int, int], ...] = ((128, 128),)
    min_fields: int = 2
    max_fields: int = 4
    max_lines: int = 3
    field_grid: int = 16

    def __post_init__(self) -> None:
        self.page_sizes = tuple(tuple(int(v) for v in s) for s in self.page_sizes)
        if not self.page_sizes or any(len(s) != 2 or min(s) < 64 for s in self.page_sizes):
            raise ValueError(f"page_sizes must be (width, height) pairs with both sides >= 64, got {self.page_sizes!r}")
        if not 2 <= self.min_fields <= self.max_fields <= 6:
            raise ValueError(f"need 2 <= min_fields <= max_fields <= 6, got min_fields={self.min_fields!r}, "
                             f"max_fields={self.max_fields!r}")
        if not 0 <= self.max_lines <= 8:
            raise ValueError(f"max_lines must be in [0, 8], got {self.max_lines!r}")
        if not isinstance(self.field_grid, int) or not (self.field_grid == 0 or self.field_grid >= _FIELD_H):
            raise ValueError(f"field_grid must be 0 or an int >= {_FIELD_H} (a field is {_FIELD_W} x {_FIELD_H} px), "
                             f"got {self.field_grid!r}")
        if self.field_grid and any(side % self.field_grid for s in self.page_sizes for side in s):
            raise ValueError(f"with field_grid={self.field_grid}, page sides must be multiples of it, "
                             f"got page_sizes={self.page_sizes!r}")


def _cluster_box(rng: np.random.Generator, width: int, height: int) -> tuple[int, int, int, int]:
    """A random 56 x 56 region (clipped to the page) where one cluster of fields goes."""
    side = 56
    x0 = int(rng.integers(2, width - side - 1))
    y0 = int(rng.integers(2, height - side - 1))
    return x0, y0, x0 + side, y0 + side


def make_docs_sample(split: str, seed: int, index: int, cfg: DocsConfig | None = None) -> Sample:
    """Sample `index` of `split` (see the module docstring); a pure function of its arguments."""
    cfg = cfg or DocsConfig()
    rng = sample_rng("docs", split, seed, index)
    qtype, answer = balanced_answer(index, QTYPES, ANSWERS)
    width, height = cfg.page_sizes[int(rng.integers(len(cfg.page_sizes)))]

    n_fields = int(rng.integers(cfg.min_fields, cfg.max_fields + 1))
    colors = [str(c) for c in rng.permutation(list(COLORS))[:n_fields]]
    digits = [str(d) for d in rng.permutation(list(DIGITS))[:n_fields]]
    # Field 0 is the asked one: force the balanced answer into it and keep the others distinct from it.
    slot = "color" if qtype == "color_of_digit" else "digit"
    values = colors if slot == "color" else digits
    if answer in values:
        values[values.index(answer)] = values[0]
    values[0] = answer

    pixels = np.full((height, width, 3), int(rng.integers(235, 251)), dtype=np.int16)  # (H, W, 3) paper
    pixels += rng.integers(-4, 5, size=(height, width, 1), dtype=np.int16)  # faint paper grain
    page = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(page)

    clusters = [_cluster_box(rng, width, height) for _ in range(int(rng.integers(1, 3)))]
    taken: list[tuple[int, int, int, int]] = []
    fields = []
    for i in range(n_fields):
        for attempt in range(400):
            # Overlapping clusters can fill up; after 200 tries the field may go anywhere on the page.
            cx0, cy0, cx1, cy1 = clusters[i % len(clusters)] if attempt < 200 else (2, 2, width - 2, height - 2)
            x = int(rng.integers(cx0, max(cx0 + 1, cx1 - _FIELD_W)))
            y = int(rng.integers(cy0, max(cy0 + 1, cy1 - _FIELD_H)))
            if cfg.field_grid:  # move into the grid cell holding (x, y), at a random offset that keeps it inside
                g = cfg.field_grid
                x = x - x % g + int(rng.integers(0, g - _FIELD_W + 1))
                y = y - y % g + int(rng.integers(0, g - _FIELD_H + 1))
            box = (x, y, x + _FIELD_W - 1, y + _FIELD_H - 1)
            if not any(boxes_overlap(box, other, gap=3) for other in taken):
                break
        else:
            raise RuntimeError(f"docs: no room for field {i} in sample {index} of {split}")
        taken.append(box)
        fill = COLORS[colors[i]]
        draw.rectangle(box, fill=fill)
        ink = (20, 20, 20) if 0.299 * fill[0] + 0.587 * fill[1] + 0.114 * fill[2] > 120 else (250, 250, 250)
        draw_digit(draw, digits[i], x + _MARGIN, y + _MARGIN, _DIGIT_W, _DIGIT_H, _STROKE, ink)
        fields.append(dict(color=colors[i], digit=digits[i], box=box))

    lines = []
    for _ in range(int(rng.integers(0, cfg.max_lines + 1))):
        length = int(rng.integers(20, width // 2))
        x, y = int(rng.integers(2, width - length - 2)), int(rng.integers(2, height - 6))
        box = (x, y, x + length - 1, y + 2)
        if any(boxes_overlap(box, other, gap=3) for other in taken):
            continue  # never cover a field
        draw.rectangle(box, fill=(150, 150, 150))
        lines.append(box)

    target = fields[0]
    question = (f"what digit is in the {target['color']} box ?" if qtype == "digit_of_color"
                else f"what color is the box with the {target['digit']} ?")
    meta = dict(benchmark="docs", split=split, seed=seed, index=index, qtype=qtype, page_size=(width, height),
                fields=fields, lines=lines, target_boxes=[target["box"]])
    return Sample(images=[page], question=question, answer=answer, choices=ANSWERS[qtype], meta=meta)
