"""Qwen2-VL (`Qwen2VLForConditionalGeneration`) and Qwen2.5-VL (`Qwen2_5_VLForConditionalGeneration`).

A prompt holds each image as `<|vision_start|>` + N x `<|image_pad|>` + `<|vision_end|>` (a video uses
`<|video_pad|>`), N = t*h*w / merge^2 of the image's grid; the merge writes the vision features into the pad
positions only, so the vision tokens are the image and video pads and the start/end markers stay text.

Positions are multi-axis (M-RoPE): the text model folds the temporal/height/width position rows into one
(cos, sin) pair per token before its decoder layers, so every layer sees plain rotate-half RoPE of shape
(B, T, head_dim) and, under `generate()`, 2-D text `position_ids` (the first of its four position rows); both are
what the default `gather_layer_kwargs` and `attention_probe` handle. Decode positions (previous + 1 on every axis,
offset by `rope_deltas`) are computed by `generate()` from the full prompt and need nothing from mmreduce.
Qwen2.5-VL's text stack is the same; only its vision tower (windowed attention, no CLS token) differs, and the
vision tower is only timed. The adapter takes the whole model or its inner `.model` (`Qwen2VLModel` /
`Qwen2_5_VLModel`, no LM head).

Token layout (`token_layout`): the images and videos of a prompt in prompt order (each run of image or video pads is
one); an image is one panel of (h/merge) x (w/merge) tokens, row-major; a video is `frames` = t panels, one per
temporal slice (panel k = slice k), each (h/merge) x (w/merge) row-major, slice after slice. Their pixels are
`pixel_values` / `pixel_values_videos` rows (flattened patches, images and videos each in prompt order), unpacked
into pictures by `PatchPacking` (the first frame of a temporal slice stands for it). `batch_token_layout` lays out
every prompt of a batch, images and videos numbered across it.

Vision tower: no CLS token, and every image of a call runs as one flattened sequence (2-D RoPE; windows in
Qwen2.5-VL), so methods that rank by the tower's CLS attention or keys are refused here; `positions="packed"` is
refused too (the positions have three axes), while pool and stride run with the original positions.
"""

from __future__ import annotations

from torch import nn

from .base import ComposedVLMAdapter, ImageGrid, Panel, PatchPacking, TokenCell

__all__ = ["Qwen2VLAdapter"]


class Qwen2VLAdapter(ComposedVLMAdapter):
    model_types = ("qwen2_vl", "qwen2_5_vl")
    vision_tower_name = "visual"
    expects = "Qwen2VLForConditionalGeneration / Qwen2_5_VLForConditionalGeneration"

    def __init__(self, model: nn.Module):
        super().__init__(model)
        config = model.config
        for name in ("image_token_id", "video_token_id"):
            if getattr(config, name, None) is None:
                raise TypeError(f"{config.model_type} config has no {name}; cannot locate the vision tokens")

    def vision_token_ids(self) -> tuple[int, ...]:
        """The image and video pad ids (`<|vision_start|>` / `<|vision_end|>` are text)."""
        config = self.model.config
        return (int(config.image_token_id), int(config.video_token_id))

    #: Qwen's ViT has no CLS token: its patches attend to each other only (and Qwen2.5-VL's mostly in windows).
    vision_has_cls = False

    def vision_attention_modules(self) -> None:
        """None: the tower runs every image of a call as one flattened sequence of variable-size grids (with 2-D
        RoPE, and windows in Qwen2.5-VL), which the per-panel CLS/key probe does not read, so methods that rank by
        the tower's attention or keys are refused on this family with a message naming the alternatives."""
        return

    def token_layout(self, inputs: dict) -> tuple[list[TokenCell], list[ImageGrid]]:
        """Images (one panel each) and videos (one panel per temporal slice) of the first prompt in prompt order,
        each panel's (h/merge) x (w/merge) tokens row-major; from `image_grid_thw` / `video_grid_thw` and the merge
        size."""
        return self._grid_layout(inputs, inputs["input_ids"][:1])

    def batch_token_layout(self, inputs: dict) -> tuple[list[TokenCell], list[ImageGrid]]:
        """`token_layout` of every prompt of the batch, prompt after prompt, images and videos numbered across it
        (`image_grid_thw` / `video_grid_thw` list them over the whole batch, in that order)."""
        return self._grid_layout(inputs, inputs["input_ids"])

    def _grid_layout(self, inputs: dict, prompts) -> tuple[list[TokenCell], list[ImageGrid]]:
        """The layout of `prompts` (B, T), the first rows of `inputs["input_ids"]`."""
        config = self.model.config
        vision = config.vision_config
        merge, patch, temporal = vision.spatial_merge_size, vision.patch_size, vision.temporal_patch_size
        kinds = {int(config.image_token_id): ("image_grid_thw", "pixel_values"),
                 int(config.video_token_id): ("video_grid_thw", "pixel_values_videos")}
        runs: list[tuple[int, int]] = []  # (pad id, length) of each run of pads, prompt after prompt
        mask = inputs.get("attention_mask")
        for row, ids in enumerate(prompts.tolist()):
            real = mask[row].tolist() if mask is not None else [1] * len(ids)
            previous = None
            for token, present in zip(ids, real):
                token = token if present else None
                if token in kinds:
                    if previous == token:
                        runs[-1] = (token, runs[-1][1] + 1)
                    else:
                        runs.append((token, 1))
                previous = token
        used = {token: 0 for token in kinds}  # images / videos of each kind laid out so far
        start = {token: 0 for token in kinds}  # first patch row of the next one
        cells: list[TokenCell] = []
        grids: list[ImageGrid] = []
        for image, (token, length) in enumerate(runs):
            grid_key, pixel_key = kinds[token]
            thw = inputs.get(grid_key)
            if thw is None or used[token] >= len(thw):
                raise ValueError(f"the prompt holds more runs of id {token} than {grid_key} lists")
            t, h, w = (int(v) for v in thw[used[token]].tolist())
            rows, cols = h // merge, w // merge
            if t * rows * cols != length:
                raise ValueError(f"{grid_key} {(t, h, w)} gives {t * rows * cols} tokens, the prompt has {length}")
            video = token == int(config.video_token_id)
            panels = tuple(Panel(rows, cols, key=pixel_key,
                                 patches=PatchPacking(start[token], (t, h, w), patch, merge, temporal, frame))
                           for frame in range(t))
            cells += [TokenCell(image, frame, r, c) for frame in range(t) for r in range(rows) for c in range(cols)]
            grids.append(ImageGrid((0, 0), rows if rows == cols else 0, panels, frames=t if video else 0))
            used[token] += 1
            start[token] += t * h * w
        return cells, grids
