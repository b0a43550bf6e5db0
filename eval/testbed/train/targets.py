"""What the training losses aim at, read off the generator's scene: per-patch class ids, image-token roles and the
classes a question names.

Per-patch ids pack two label planes in one integer (`class_layout`): (colour, shape) as colour * 8 + shape on
`shapes` and `video` (per frame) and (mark colour, digit) as colour * 16 + digit on `docs`; 0 is background, -100 marks a token with no
target (the LLaVA-NeXT base view and row newlines, the InternVL thumbnail).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch
from PIL import Image, ImageDraw

from ...benchmarks.draw import COLORS, SHAPES, draw_shape
from ...tiny_models import TinyVLMConfig
from ..grounding import is_clip, object_boxes, target_positions, video_frames

__all__ = [
    "asked_classes",
    "aux_targets",
    "class_layout",
    "colour_word_roles",
    "draw_label_map",
    "frame_targets",
    "internvl_tile_grid",
    "named_classes",
    "names_a_reference",
    "other_object_positions",
    "patch_labels",
    "relevance_targets",
    "sequence_targets",
]

_COLOR_IDS = {c: i + 1 for i, c in enumerate(COLORS)}  # 0 = background
_SHAPE_IDS = {s: i + 1 for i, s in enumerate(SHAPES)}


def class_layout(benchmark: str) -> tuple[int, int, int]:
    """(packing base, colour classes, shape / digit classes) of the per-patch ids (see `draw_label_map`): ids pack
    (colour, shape) as colour * 8 + shape on `shapes` and (mark colour, digit) as colour * 16 + digit on `docs`;
    both class counts include "none". `video` frames are labelled as `shapes` scenes."""
    if benchmark in ("shapes", "video"):
        return 8, 1 + len(COLORS), 1 + len(SHAPES)
    return 16, 1 + len(COLORS), 1 + 10


def draw_label_map(sample, size: tuple[int, int]) -> np.ndarray:
    """Per-pixel class ids, (H, W) int64, of what the generator drew (see `patch_labels`); for `video`, of one
    frame (`grounding.video_frames`)."""
    width, height = size
    meta = sample.meta
    if is_clip(sample):
        raise ValueError("a video sample has one label map per frame: draw those of grounding.video_frames(sample)")
    if meta["benchmark"] in ("shapes", "video"):
        # Two label planes packed in one id: colour * 8 + shape (ids < 8).
        canvas = Image.new("I", (width, height), 0)
        draw = ImageDraw.Draw(canvas)
        for o in meta["objects"]:
            packed = _COLOR_IDS[o["color"]] * 8 + _SHAPE_IDS[o["shape"]]
            draw_shape(draw, o["shape"], o["cx"], o["cy"], o["radius"], packed)
        return np.asarray(canvas, dtype=np.int64)
    # Two label planes packed in one id: box colour * 16 + digit (1-10; 0 = none). Text lines stay background.
    canvas = np.zeros((height, width), dtype=np.int64)
    for f in meta["fields"]:
        x0, y0, x1, y1 = f["box"]
        canvas[y0:y1 + 1, x0:x1 + 1] = _COLOR_IDS[f["color"]] * 16  # the coloured box
        canvas[y0 + 2:y1 - 1, x0 + 2:x1 - 1] += 1 + int(f["digit"])  # the digit inside its 2 px margin
    return canvas


def patch_labels(label_map: np.ndarray, patch: int, min_pixels: int) -> np.ndarray:
    """Most frequent non-background id per `patch` x `patch` cell if it covers >= `min_pixels`, else 0.

    label_map: (H, W) ids -> (H / patch, W / patch) ids.
    """
    h, w = label_map.shape
    cells = label_map.reshape(h // patch, patch, w // patch, patch).transpose(0, 2, 1, 3)  # (gh, gw, p, p)
    cells = cells.reshape(h // patch, w // patch, patch * patch)  # (gh, gw, p*p)
    counts = (cells[..., None] == np.arange(int(label_map.max()) + 1)).sum(2)  # (gh, gw, ids)
    counts[..., 0] = 0  # background never wins
    best = counts.argmax(-1)  # (gh, gw); ties go to the smallest id
    return np.where(np.take_along_axis(counts, best[..., None], -1)[..., 0] >= max(1, min_pixels), best, 0)


def _planes(label_map: np.ndarray, base: int, patch: int) -> np.ndarray:
    """Patch labels of each packed plane (id = high * base + low) separately, packed again."""
    high = patch_labels(label_map // base, patch, min_pixels=6)
    low = patch_labels(label_map % base, patch, min_pixels=6)
    return high * base + low


def internvl_tile_grid(size: tuple[int, int], recipe: TinyVLMConfig) -> tuple[int, int]:
    """(columns, rows) of the tiles InternVL's image processor cuts a `size` = (width, height) page into; the page
    must be exactly that canvas (tiles of `recipe.image_size`), so that no tile is resampled."""
    from transformers.models.got_ocr2.image_processing_got_ocr2 import get_optimal_tiled_canvas

    width, height = size
    side = recipe.image_size
    cols, rows = get_optimal_tiled_canvas((height, width), (side, side), 1, recipe.max_tiles)
    if (cols * side, rows * side) != (width, height):
        raise RuntimeError(f"the image processor resizes a {width}x{height} page to {cols * side}x{rows * side}; "
                           f"pages must be a {side} px tile canvas of at most {recipe.max_tiles} tiles")
    return cols, rows


def _internvl_tiles(sample, recipe: TinyVLMConfig) -> list[np.ndarray]:
    """Per tile, in the processor's order (the crops row-major, then the thumbnail when there is more than one
    crop), its tokens' packed ids in pixel-shuffle order ((per * per,) each, per = tokens per tile side).

    A token is one 2 x 2 block of patches (pixel shuffle 0.5), row-major within its tile, so it sees a
    2 * patch_size square of the page. The thumbnail is a down-scaled view: -100.
    """
    cols, rows = internvl_tile_grid(sample.image.size, recipe)
    cell, per = 2 * recipe.patch_size, recipe.image_size // (2 * recipe.patch_size)
    grid = _planes(draw_label_map(sample, sample.image.size), 16, cell)  # (H / cell, W / cell)
    tiles = [grid[r * per:(r + 1) * per, c * per:(c + 1) * per].reshape(-1) for r in range(rows) for c in range(cols)]
    if len(tiles) > 1:
        tiles.append(np.full(per * per, -100))
    return tiles


def aux_targets(samples, recipe: TinyVLMConfig, image_sizes) -> torch.Tensor:
    """Per-vision-token targets in the projector's output order; -100 where there is no target.

    llava: (B, N) for N = (image_size / patch)^2; for `video`, (B * frames, N), each sample's frames in order
    (the processor's order of the images). llava_next: (sum of crops, n) with the base image first
    per sample (ignored: it is a down-scaled view) and then the grid crops in row-major order. internvl: (sum of
    tiles, n) with the crops row-major and then the thumbnail (ignored) per sample (`_internvl_tiles`).
    """
    p, side = recipe.patch_size, recipe.image_size
    rows = []
    for k, s in enumerate(samples):
        if recipe.arch == "llava":
            rows += [patch_labels(draw_label_map(f, (side, side)), p, min_pixels=6).reshape(-1) for f in _scenes(s)]
            continue
        if recipe.arch == "internvl":
            rows += _internvl_tiles(s, recipe)
            continue
        width, height = s.image.size
        grid = _planes(draw_label_map(s, (width, height)), 16, p)  # (H/p, W/p)
        rows.append(np.full((side // p) ** 2, -100))  # base image
        per = side // p
        for r in range(height // side):
            for c in range(width // side):
                rows.append(grid[r * per:(r + 1) * per, c * per:(c + 1) * per].reshape(-1))  # (per*per,)
        # Pinpoints larger than the page would add padded crops; configs keep pages equal to a pinpoint.
        if image_sizes is not None and tuple(image_sizes[k].tolist()) != (height, width):
            raise RuntimeError(f"processor resized a {width}x{height} page; pages must equal a pinpoint")
    return torch.from_numpy(np.stack(rows))


def sequence_targets(samples, recipe: TinyVLMConfig) -> list[torch.Tensor]:
    """Per sample, the per-patch ids of `aux_targets` in the order of the image tokens in the prompt; (n_b,).

    llava: the grid in row-major order (`video`: frame after frame). llava_next (page equal to a pinpoint, no unpadding): the base view
    (-100, a down-scaled copy), then the full-resolution grid row by row, each row followed by its newline (-100).
    internvl: tile after tile as `aux_targets` has them (the thumbnail last, -100).
    """
    p, side = recipe.patch_size, recipe.image_size
    out = []
    for s in samples:
        if recipe.arch == "llava":
            out.append(torch.from_numpy(np.concatenate([patch_labels(draw_label_map(f, (side, side)), p,
                                                                     min_pixels=6).reshape(-1) for f in _scenes(s)])))
            continue
        if recipe.arch == "internvl":
            out.append(torch.from_numpy(np.concatenate(_internvl_tiles(s, recipe))))
            continue
        width, height = s.image.size
        grid = _planes(draw_label_map(s, (width, height)), 16, p)  # (H/p, W/p)
        newline = np.full((grid.shape[0], 1), -100)
        rows = np.concatenate([grid, newline], axis=1).reshape(-1)  # (H/p * (W/p + 1),)
        out.append(torch.from_numpy(np.concatenate([np.full((side // p) ** 2, -100), rows])))
    return out


def _scenes(sample) -> list:
    """The one-image scenes of a sample: its frames for `video`, else the sample itself."""
    return video_frames(sample) if is_clip(sample) else [sample]


def frame_targets(n_vision: torch.Tensor, frames: int) -> torch.Tensor:
    """Per image token, the index of the frame it belongs to, for samples of `frames` images with the same number
    of tokens each, concatenated in batch order; n_vision: (B,) image tokens per sample -> (sum n_vision,) long."""
    if bool((n_vision % frames).any()):
        raise RuntimeError(f"image tokens per sample {n_vision.tolist()} are not a multiple of frames={frames}")
    return torch.cat([torch.arange(frames).repeat_interleave(int(n) // frames) for n in n_vision])


def asked_classes(sample, benchmark: str) -> tuple[list[int], list[int]]:
    """Class ids (as in `draw_label_map`'s two planes) of the colours and of the shapes / digits the question names."""
    words = sample.question.split()
    colours = [_COLOR_IDS[w] for w in words if w in _COLOR_IDS]
    if benchmark in ("shapes", "video"):
        return colours, [_SHAPE_IDS[w] for w in words if w in _SHAPE_IDS]
    return colours, [1 + int(w) for w in words if w.isdigit()]


def names_a_reference(sample) -> bool:
    """Whether the question names a reference object after the asked one: `position` ("where is the A object
    relative to the B object ?"), whose second target box and second colour word are the reference's."""
    return sample.meta.get("qtype") == "position"


def relevance_targets(sample, n_vision: int, config) -> torch.Tensor:
    """Per image token, its role for the question: 0 none, 1 under an asked object, 2 under the reference object
    of a `position` question ("relative to the X object"); (n_vision,) long, in the prompt's image-token order.

    With the question before the image, every image token can work out its own role from the question and its own
    content (a local test), so the answer position only has to find the tokens that flagged themselves. Boxes are
    `meta["target_boxes"]` in the generator's order (for `position`, the asked object first). In a `video` clip
    the asked object is the actor, in every frame where it is visible.
    """
    roles = torch.zeros(n_vision, dtype=torch.long)
    if is_clip(sample):
        roles[target_positions(sample, torch.arange(n_vision), config)] = 1
        return roles
    reference = 1 if names_a_reference(sample) else None
    for i, box in enumerate(sample.meta["target_boxes"]):
        one = replace(sample, meta={**sample.meta, "target_boxes": [box]})
        roles[target_positions(one, torch.arange(n_vision), config)] = 2 if i == reference else 1
    return roles


def named_classes(samples, benchmark: str, by_role: bool = False) -> torch.Tensor:
    """(B, C) multi-hot of the colour and shape / digit classes each question names (`class_layout`'s classes).

    by_role: (B, 2C), the classes named for the asked object, then those named for the reference object of a
    `position` question ("where is the A object relative to the B object ?": A asked, B reference). Without the
    split both colours of a `position` question land in one multi-hot, and an image token cannot tell from it
    whether it is the asked object or the reference (measured: a linear probe told the two roles apart for 76% of
    the tokens, and `position` answers had the right axis but a chance sign).
    """
    _, n_col, n_other = class_layout(benchmark)
    width = n_col + n_other
    wanted = torch.zeros(len(samples), 2 * width if by_role else width)
    for b, sample in enumerate(samples):
        colours, others = asked_classes(sample, benchmark)
        if by_role and names_a_reference(sample):
            asked, reference = colours  # the question names exactly two colours, the asked one first
            wanted[b, width + reference] = 1.0
            colours = [asked]
        wanted[b, colours] = 1.0
        wanted[b, [n_col + o for o in others]] = 1.0
    return wanted


def colour_word_roles(samples, ids: torch.Tensor, colour_ids: torch.Tensor, colon_at: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """The question's colour words and their roles: ((B, T) bool mask, (n_words,) long with 0 = names the asked
    object, 1 = names the reference of a `position` question, its second colour word), in row-major order."""
    words = torch.isin(ids, colour_ids) & (torch.arange(ids.shape[1])[None] < colon_at[:, None])  # (B, T)
    roles = []
    for b, sample in enumerate(samples):
        n = int(words[b].sum())
        role = torch.zeros(n, dtype=torch.long)
        if names_a_reference(sample):
            if n != 2:
                raise RuntimeError(f"a position question names two colours, found {n} in {sample.question!r}")
            role[1] = 1
        roles.append(role)
    return words, torch.cat(roles)


def other_object_positions(sample, vision_positions: torch.Tensor, config, targets: torch.Tensor) -> torch.Tensor:
    """Positions of the image tokens under objects that are not the asked ones (distractors); (k,) long."""
    everything = target_positions(replace(sample, meta={**sample.meta, "target_boxes": object_boxes(sample)}),
                                  vision_positions, config)
    return everything[~torch.isin(everything, targets)]
