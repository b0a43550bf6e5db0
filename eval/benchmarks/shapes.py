"""`shapes`: 1-8 small coloured shapes on a plain or textured grey background, five question types.

Question types and their closed answer sets (each exactly balanced, see `base.balanced_answer`):

| qtype | question | answers |
|---|---|---|
| color_of_shape | what color is the {shape} ? | the 6 colours |
| shape_of_color | what shape is the {color} object ? | the 4 shapes |
| exists | is there a {color} {shape} ? | yes, no |
| count | how many {color} objects are there ? | one, two, three |
| position | where is the {color} object relative to the {color} object ? | left, right, above, below |

Scenes are built to make every question unambiguous (the asked shape or colour is unique when the question says
"the"), and "no" scenes for `exists` hold distractors that share the colour or the shape, so the answer needs
the binding of both. Objects (outlined in dark grey) cover about 8% of the image: most vision tokens are background.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import ImageDraw

from .base import Sample, balanced_answer, sample_rng
from .draw import COLORS, SHAPES, background, boxes_overlap, draw_shape, shape_box

__all__ = ["QTYPES", "ShapesConfig", "make_shapes_sample"]

QTYPES: tuple[str, ...] = ("color_of_shape", "shape_of_color", "exists", "count", "position")
_COLOR_NAMES = tuple(COLORS)
ANSWERS: dict[str, tuple[str, ...]] = {
    "color_of_shape": _COLOR_NAMES,
    "shape_of_color": SHAPES,
    "exists": ("yes", "no"),
    "count": ("one", "two", "three"),
    "position": ("left", "right", "above", "below"),
}
_COUNT_WORDS = {"one": 1, "two": 2, "three": 3}
OUTLINE = (24, 24, 24)


@dataclass
class ShapesConfig:
    """Generator settings.

    - image_size: side of the square image in pixels.
    - min_objects, max_objects: objects per image (the question's own objects included).
    - small_fraction: share of objects drawn small.
    - textured_fraction: share of images with a noisy, striped background.
    - qtypes: question types to draw from (cycled in this order).
    """

    image_size: int = 128
    min_objects: int = 1
    max_objects: int = 8
    small_fraction: float = 0.5
    textured_fraction: float = 0.5
    qtypes: tuple[str, ...] = QTYPES

    def __post_init__(self) -> None:
        if not isinstance(self.image_size, int) or self.image_size < 64:
            raise ValueError(f"image_size must be an int >= 64, got {self.image_size!r}")
        if not 1 <= self.min_objects <= self.max_objects <= 8:
            raise ValueError(f"need 1 <= min_objects <= max_objects <= 8, got min_objects={self.min_objects!r}, "
                             f"max_objects={self.max_objects!r}")
        for name in ("small_fraction", "textured_fraction"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value!r}")
        self.qtypes = tuple(self.qtypes)
        unknown = [q for q in self.qtypes if q not in QTYPES]
        if not self.qtypes or unknown:
            raise ValueError(f"qtypes must be a non-empty subset of {QTYPES}, got {self.qtypes!r}")

    def radius(self, rng: np.random.Generator, small: bool) -> int:
        """Half-size in pixels: at 128 px small objects are 11-15 px wide (about two 8 px patches), large 17-23."""
        low, high = (0.04, 0.055) if small else (0.065, 0.085)
        return int(round(self.image_size * rng.uniform(low, high)))


def _place(rng: np.random.Generator, cfg: ShapesConfig, radius: int, taken: list[tuple[int, int, int, int]],
           region: tuple[int, int, int, int] | None = None) -> tuple[int, int] | None:
    """A free centre for a shape of `radius`, optionally inside `region = (x0, y0, x1, y1)` (centre bounds)."""
    margin = radius + 2
    x0, y0, x1, y1 = region or (margin, margin, cfg.image_size - 1 - margin, cfg.image_size - 1 - margin)
    x0, y0 = max(x0, margin), max(y0, margin)
    x1, y1 = min(x1, cfg.image_size - 1 - margin), min(y1, cfg.image_size - 1 - margin)
    if x0 > x1 or y0 > y1:
        return None
    for _ in range(200):
        cx, cy = int(rng.integers(x0, x1 + 1)), int(rng.integers(y0, y1 + 1))
        if not any(boxes_overlap(shape_box(cx, cy, radius), box, gap=3) for box in taken):
            return cx, cy
    return None


def _pick(rng: np.random.Generator, options: tuple[str, ...], exclude: set[str] = frozenset()) -> str:
    allowed = [o for o in options if o not in exclude]
    return allowed[int(rng.integers(len(allowed)))]


def _plan(rng: np.random.Generator, qtype: str, answer: str) -> tuple[str, list[dict], list[tuple[str, str]]]:
    """Question text, the objects the answer depends on, and the (colour, shape) pairs distractors must avoid.

    The avoid list holds `(colour, None)` / `(None, shape)` wildcards as `(c, "*")` / `("*", s)`.
    """
    if qtype == "color_of_shape":
        shape = _pick(rng, SHAPES)
        return f"what color is the {shape} ?", [dict(shape=shape, color=answer)], [("*", shape)]
    if qtype == "shape_of_color":
        color = _pick(rng, _COLOR_NAMES)
        return f"what shape is the {color} object ?", [dict(shape=answer, color=color)], [(color, "*")]
    if qtype == "exists":
        color, shape = _pick(rng, _COLOR_NAMES), _pick(rng, SHAPES)
        question = f"is there a {color} {shape} ?"
        if answer == "yes":
            return question, [dict(shape=shape, color=color)], []
        # Near misses (same colour, other shape; same shape, other colour) make "no" need the binding.
        near = [dict(shape=_pick(rng, SHAPES, {shape}), color=color), dict(shape=shape, color=_pick(rng, _COLOR_NAMES, {color}))]
        keep = near[: int(rng.integers(0, 3))]
        return question, [dict(o, distractor=True) for o in keep], [(color, shape)]
    if qtype == "count":
        color = _pick(rng, _COLOR_NAMES)
        targets = [dict(shape=_pick(rng, SHAPES), color=color) for _ in range(_COUNT_WORDS[answer])]
        return f"how many {color} objects are there ?", targets, [(color, "*")]
    if qtype == "position":
        first = _pick(rng, _COLOR_NAMES)
        second = _pick(rng, _COLOR_NAMES, {first})
        targets = [dict(shape=_pick(rng, SHAPES), color=first), dict(shape=_pick(rng, SHAPES), color=second)]
        question = f"where is the {first} object relative to the {second} object ?"
        return question, targets, [(first, "*"), (second, "*")]
    raise ValueError(f"qtype must be one of {QTYPES}, got {qtype!r}")


def _allowed(color: str, shape: str, avoid: list[tuple[str, str]]) -> bool:
    return not any((c in ("*", color)) and (s in ("*", shape)) for c, s in avoid)


def _position_regions(rng: np.random.Generator, size: int, answer: str) -> tuple[tuple, tuple]:
    """Centre regions for the two position objects so that `answer` is the dominant, unambiguous relation."""
    third = size // 3
    lo = (0, third)            # first third along the deciding axis
    hi = (2 * third, size)      # last third: the centres are at least a third of the image apart
    # A shared band a quarter wide on the other axis keeps that offset (< size/4) below the deciding one (> size/3).
    quarter = size // 4
    along = int(rng.integers(0, size - quarter))
    band = (along, along + quarter)
    if answer in ("left", "right"):
        a, b = (lo, hi) if answer == "left" else (hi, lo)
        return (a[0], band[0], a[1], band[1]), (b[0], band[0], b[1], band[1])
    a, b = (lo, hi) if answer == "above" else (hi, lo)
    return (band[0], a[0], band[1], a[1]), (band[0], b[0], band[1], b[1])


def make_shapes_sample(split: str, seed: int, index: int, cfg: ShapesConfig | None = None) -> Sample:
    """Sample `index` of `split` (see the module docstring); a pure function of its arguments."""
    cfg = cfg or ShapesConfig()
    rng = sample_rng("shapes", split, seed, index)
    qtype, answer = balanced_answer(index, cfg.qtypes, ANSWERS)
    question, targets, avoid = _plan(rng, qtype, answer)
    regions = _position_regions(rng, cfg.image_size, answer) if qtype == "position" else (None,) * len(targets)

    n_objects = max(len(targets), int(rng.integers(cfg.min_objects, cfg.max_objects + 1)))
    specs = list(targets)
    while len(specs) < n_objects:
        color, shape = _pick(rng, _COLOR_NAMES), _pick(rng, SHAPES)
        if _allowed(color, shape, avoid):
            specs.append(dict(shape=shape, color=color, distractor=True))

    image = background(rng, (cfg.image_size, cfg.image_size), textured=bool(rng.random() < cfg.textured_fraction))
    draw = ImageDraw.Draw(image)
    objects, taken = [], []
    for i, spec in enumerate(specs):
        small = bool(rng.random() < cfg.small_fraction)
        radius = cfg.radius(rng, small)
        centre = _place(rng, cfg, radius, taken, regions[i] if i < len(regions) and not spec.get("distractor") else None)
        if centre is None:
            if not spec.get("distractor"):
                raise RuntimeError(f"shapes: no room for a target object in sample {index} of {split}")
            continue  # a crowded image simply gets one distractor fewer
        taken.append(shape_box(*centre, radius))
        # A dark outline makes the outline, and so the shape, visible whatever the colour: without it a tiny
        # vision tower must learn a separate edge detector per colour (measured: shape stayed at chance).
        draw_shape(draw, spec["shape"], *centre, radius, COLORS[spec["color"]], outline=OUTLINE)
        objects.append(dict(shape=spec["shape"], color=spec["color"], cx=centre[0], cy=centre[1], radius=radius,
                            small=small, target=not spec.get("distractor", False)))

    meta = dict(benchmark="shapes", split=split, seed=seed, index=index, qtype=qtype, objects=objects,
                target_boxes=[shape_box(o["cx"], o["cy"], o["radius"]) for o in objects if o["target"]])
    return Sample(images=[image], question=question, answer=answer, choices=ANSWERS[qtype], meta=meta)
