"""Drawing primitives shared by the generators: palette, shapes, backgrounds and seven-segment digits.

Everything is drawn with PIL's integer primitives (no fonts, no anti-aliasing), so the pixels do not depend on
the installed fonts or FreeType version.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["COLORS", "SHAPES", "background", "boxes_overlap", "draw_digit", "draw_shape", "shape_box"]

#: Saturated colours that stay distinct from each other and from the grey backgrounds.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (230, 25, 30),
    "green": (30, 200, 40),
    "blue": (30, 70, 240),
    "yellow": (245, 225, 20),
    "purple": (160, 40, 220),
    "cyan": (20, 220, 230),
}

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")


def background(rng: np.random.Generator, size: tuple[int, int], textured: bool, base: int | None = None) -> Image.Image:
    """A grey background of `size = (width, height)`, plain or with faint noise and stripes.

    The texture's amplitude stays well below the contrast of any palette colour, so it is distractor, not content.
    """
    width, height = size
    level = int(rng.integers(70, 130)) if base is None else base
    pixels = np.full((height, width, 3), level, dtype=np.int16)  # (H, W, 3)
    if textured:
        pixels += rng.integers(-12, 13, size=(height, width, 1), dtype=np.int16)  # grey noise, same on RGB
        period = int(rng.integers(6, 14))
        stripes = ((np.arange(width)[None, :] + np.arange(height)[:, None]) // period) % 2  # (H, W) diagonal
        pixels += (stripes * int(rng.integers(6, 14)))[:, :, None].astype(np.int16)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def shape_box(cx: int, cy: int, radius: int) -> tuple[int, int, int, int]:
    """Pixel box `(x0, y0, x1, y1)` (inclusive) that a shape centred at (cx, cy) with `radius` covers."""
    return (cx - radius, cy - radius, cx + radius, cy + radius)


def boxes_overlap(a: tuple[int, int, int, int], b: tuple[int, int, int, int], gap: int) -> bool:
    """True when boxes `a` and `b` come closer than `gap` pixels."""
    return not (a[2] + gap < b[0] or b[2] + gap < a[0] or a[3] + gap < b[1] or b[3] + gap < a[1])


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: int, cy: int, radius: int, color,
               outline=None) -> None:
    """Draw a filled `shape` of half-size `radius` centred at (cx, cy), optionally with a 1 px `outline`.

    The outline lies inside the filled footprint, so a label map drawn without it covers the same pixels.
    """
    x0, y0, x1, y1 = shape_box(cx, cy, radius)
    edge = dict(outline=outline, width=1) if outline is not None else {}
    if shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=color, **edge)
    elif shape == "square":
        # A square as wide as the circle looks bigger; shrink it so the two differ in outline, not in area.
        inset = max(1, radius // 5)
        draw.rectangle((x0 + inset, y0 + inset, x1 - inset, y1 - inset), fill=color, **edge)
    elif shape == "triangle":
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=color, **edge)
    elif shape == "cross":
        arm = max(1, radius // 3)
        if outline is None:
            draw.rectangle((cx - arm, y0, cx + arm, y1), fill=color)
            draw.rectangle((x0, cy - arm, x1, cy + arm), fill=color)
        else:  # one outline around the whole cross, not around each bar
            draw.polygon([(cx - arm, y0), (cx + arm, y0), (cx + arm, cy - arm), (x1, cy - arm), (x1, cy + arm),
                          (cx + arm, cy + arm), (cx + arm, y1), (cx - arm, y1), (cx - arm, cy + arm), (x0, cy + arm),
                          (x0, cy - arm), (cx - arm, cy - arm)], fill=color, **edge)
    else:
        raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}")


# Seven-segment layout: a=top, b=top right, c=bottom right, d=bottom, e=bottom left, f=top left, g=middle.
_SEGMENTS = {
    "0": "abcdef", "1": "bc", "2": "abdeg", "3": "abcdg", "4": "bcfg",
    "5": "acdfg", "6": "acdefg", "7": "abc", "8": "abcdefg", "9": "abcdfg",
}


def draw_digit(draw: ImageDraw.ImageDraw, digit: str, x: int, y: int, width: int, height: int, stroke: int,
               color: tuple[int, int, int]) -> None:
    """Draw `digit` as a seven-segment glyph in the box with top-left (x, y) and the given size."""
    if digit not in _SEGMENTS:
        raise ValueError(f"digit must be one of 0-9, got {digit!r}")
    mid = y + (height - stroke) // 2
    right, bottom = x + width - stroke, y + height - stroke
    rects = {
        "a": (x, y, x + width - 1, y + stroke - 1),
        "b": (right, y, right + stroke - 1, mid + stroke - 1),
        "c": (right, mid, right + stroke - 1, bottom + stroke - 1),
        "d": (x, bottom, x + width - 1, bottom + stroke - 1),
        "e": (x, mid, x + stroke - 1, bottom + stroke - 1),
        "f": (x, y, x + stroke - 1, mid + stroke - 1),
        "g": (x, mid, x + width - 1, mid + stroke - 1),
    }
    for segment in _SEGMENTS[digit]:
        draw.rectangle(rects[segment], fill=color)
