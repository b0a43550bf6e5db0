"""Attention grounding loss for training the tiny VLMs (training only).

Real LLaVA models attend, from the last prompt token in the middle layers, to the image tokens that hold the
answer; FastV and PyramidDrop rely on exactly that. A tiny model trained from scratch in minutes does not get
there on its own, so training adds a loss: in the chosen decoder layers, the head-averaged attention of the
answer-predicting position (the ":" after the first "ASSISTANT") should put its mass on the vision tokens under
the objects the answer depends on (`Sample.meta["target_boxes"]`). Scores are recomputed from each layer's own
input norm, q/k projections and RoPE, as the attention itself does (causal; padding keys masked).
"""

from __future__ import annotations

import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

__all__ = ["GroundingProbe", "is_clip", "object_boxes", "target_positions", "video_frames"]


def _boxes_to_cells(boxes, cell: int, grid_h: int, grid_w: int) -> set[tuple[int, int]]:
    cells = set()
    for x0, y0, x1, y1 in boxes:
        for r in range(max(0, y0 // cell), min(grid_h, y1 // cell + 1)):
            for c in range(max(0, x0 // cell), min(grid_w, x1 // cell + 1)):
                cells.add((r, c))
    return cells


def is_clip(sample) -> bool:
    """Whether `sample` is a whole `video` sample (several frames), not one scene."""
    return "frame_indices" in sample.meta


def video_frames(sample) -> list:
    """A `video` sample as one scene per frame of `Sample.images`, in order, each a one-image sample whose meta is
    laid out as a `shapes` scene: `objects` (the static distractors, then the actor where it is visible, in its
    colour of that frame) and `target_boxes` (the actor's box where it is visible, else none), plus `frame`."""
    from dataclasses import replace

    from ..benchmarks.draw import shape_box

    meta = sample.meta
    scenes = []
    for k, t in enumerate(meta["frame_indices"]):
        x0, _, x1, _ = meta["target_boxes"][k]
        cx, cy = meta["track"][t]
        visible = t >= meta["appear_at"]
        actor = dict(shape=meta["shape"], color=meta["colors"][t], cx=cx, cy=cy, radius=(x1 - x0) // 2)
        scene = dict(benchmark="video", qtype=meta["qtype"], frame=k,
                     objects=[*meta["distractors"], *([actor] if visible else [])],
                     target_boxes=[shape_box(cx, cy, actor["radius"])] if visible else [])
        scenes.append(replace(sample, images=[sample.images[k]], meta=scene))
    return scenes


def object_boxes(sample) -> list[tuple[int, int, int, int]]:
    """Pixel boxes of every object in the scene (`shapes` objects, a video frame's objects or `docs` fields), asked
    or not."""
    from ..benchmarks.draw import shape_box

    if "objects" in sample.meta:
        return [shape_box(o["cx"], o["cy"], o["radius"]) for o in sample.meta["objects"]]
    return [f["box"] for f in sample.meta["fields"]]


def target_positions(sample, vision_positions: torch.Tensor, config) -> torch.Tensor:
    """Sequence positions of the vision tokens under the sample's target boxes; (k,) long, maybe empty.

    vision_positions: (n_vision,) positions of the image tokens of this sample, in order.
    LLaVA-1.5: a row-major grid x grid map; a `video` sample: one such map per frame, frame after frame, each
    with the boxes of that frame (`video_frames`). LLaVA-NeXT (page equal to a pinpoint, no unpadding): the base image's
    g x g map (the page resized to one crop), then the full-resolution map row by row, each row followed by
    one newline token. InternVL (page equal to its tile canvas): `_internvl_positions`.
    """
    if config.model_type == "internvl":
        return _internvl_positions(sample, vision_positions, config)
    if is_clip(sample):
        frames = video_frames(sample)
        per = vision_positions.numel() // len(frames)
        if config.model_type != "llava" or per * len(frames) != vision_positions.numel():
            raise RuntimeError(f"a {len(frames)}-frame clip needs a llava model with the same number of vision "
                               f"tokens per frame, got {config.model_type} with {vision_positions.numel()}")
        return torch.cat([target_positions(frame, vision_positions[k * per:(k + 1) * per], config)
                          for k, frame in enumerate(frames)])
    patch, side = config.vision_config.patch_size, config.vision_config.image_size
    g = side // patch
    boxes = sample.meta["target_boxes"]
    if config.model_type == "llava":
        index = [r * g + c for r, c in _boxes_to_cells(boxes, patch, g, g)]
    else:
        width, height = sample.image.size
        rows, cols = height // patch, width // patch
        base_cell = max(width, height) // g  # the base view shows the whole page in g x g cells
        index = [r * g + c for r, c in _boxes_to_cells(boxes, base_cell, g, g)]
        index += [g * g + r * (cols + 1) + c for r, c in _boxes_to_cells(boxes, patch, rows, cols)]
        if g * g + rows * (cols + 1) != vision_positions.numel():
            raise RuntimeError(f"unexpected vision token count {vision_positions.numel()} for a {width}x{height} page")
    return vision_positions[sorted(index)] if index else vision_positions[:0]


def _internvl_positions(sample, vision_positions: torch.Tensor, config) -> torch.Tensor:
    """InternVL: the page's tiles row-major, then (with more than one tile) a thumbnail of the whole page resized
    to one tile; each tile gives t x t tokens in row-major order, one per 2 x 2 patches (pixel shuffle 0.5). The
    page must be exactly its tile canvas (`vision_positions` then holds 16 x (tiles + thumbnail) tokens)."""
    side, patch = (v if isinstance(v, int) else v[0]  # (height, width) pairs in a saved config
                   for v in (config.vision_config.image_size, config.vision_config.patch_size))
    cell = int(patch / config.downsample_ratio)  # the page pixels one token sees, per side
    t = side // cell
    width, height = sample.image.size
    cols, rows = width // side, height // side
    tiles = cols * rows + (cols * rows > 1)
    if (cols * side, rows * side) != (width, height) or tiles * t * t != vision_positions.numel():
        raise RuntimeError(f"unexpected vision token count {vision_positions.numel()} for a {width}x{height} page")
    boxes = sample.meta["target_boxes"]
    index = [((r // t) * cols + c // t) * t * t + (r % t) * t + c % t
             for r, c in _boxes_to_cells(boxes, cell, rows * t, cols * t)]
    if tiles > 1:  # the thumbnail: the boxes scaled to one tile
        scaled = [(x0 * side // width, y0 * side // height, x1 * side // width, y1 * side // height)
                  for x0, y0, x1, y1 in boxes]
        index += [cols * rows * t * t + r * t + c for r, c in _boxes_to_cells(scaled, cell, t, t)]
    return vision_positions[sorted(index)] if index else vision_positions[:0]


class GroundingProbe:
    """Forward pre-hooks on `layers` that compute the grounding loss of one forward pass.

    Set `query` ((B,) positions) and `targets` (list of (k_b,) position tensors) before the forward; read
    `loss()` after it. Samples with no targets are skipped.
    """

    def __init__(self, model, layers: tuple[int, ...], heads: int = 0):
        decoder = model.model.language_model.layers
        self.query: torch.Tensor | None = None
        self.key_valid: torch.Tensor | None = None  # (B, T) attention_mask of the inputs
        self.targets: list[torch.Tensor] = []
        self.negatives: list[torch.Tensor] = []  # optional, per sample: positions the targets must outscore
        self.heads = heads  # supervise the mean of the first `heads` heads only (0 = all): the others stay free
        self.values: list[torch.Tensor] = []  # per hooked layer, (B, T, Hkv * hd): what attention reads
        self._losses: list[torch.Tensor] = []
        self._handles = [decoder[i].register_forward_pre_hook(self._hook, with_kwargs=True) for i in layers]

    def _hook(self, layer, args, kwargs):
        if self.query is None:
            return None
        hidden = kwargs.get("hidden_states", args[0] if args else None)  # (B, T, D)
        attn = layer.self_attn
        batch, length, _ = hidden.shape
        cos, sin = (t.expand(batch, -1, -1) for t in kwargs["position_embeddings"])  # (1 or B, T, hd) -> (B, T, hd)
        x = layer.input_layernorm(hidden)
        self.values.append(attn.v_proj(x))  # (B, T, Hkv * hd)
        rows = torch.arange(batch)
        q = attn.q_proj(x[rows, self.query]).view(batch, 1, -1, attn.head_dim).transpose(1, 2)  # (B, H, 1, hd)
        k = attn.k_proj(x).view(batch, length, -1, attn.head_dim).transpose(1, 2)  # (B, Hkv, T, hd)
        q, _ = apply_rotary_pos_emb(q, q, cos[rows, self.query][:, None], sin[rows, self.query][:, None])
        _, k = apply_rotary_pos_emb(k, k, cos, sin)
        k = repeat_kv(k, attn.num_key_value_groups)  # (B, H, T, hd)
        scores = (q @ k.transpose(-1, -2)).squeeze(2) * attn.scaling  # (B, H, T)
        allowed = (torch.arange(length)[None] <= self.query[:, None]) & self.key_valid.bool()  # (B, T)
        probs = scores.masked_fill(~allowed[:, None], float("-inf")).softmax(-1)  # (B, H, T)
        probs = probs[:, :self.heads or None].mean(1)  # (B, T) mean over the supervised heads
        for b, positions in enumerate(self.targets):
            if positions.numel():
                self._losses.append(-torch.log(probs[b, positions].sum().clamp_min(1e-6)))
        mean_scores = scores[:, :self.heads or None].mean(1)  # (B, T)
        for b, (positions, negatives) in enumerate(zip(self.targets, self.negatives)):
            if positions.numel() and negatives.numel():
                # Contrast: the asked objects must outscore the other objects by a margin, which "look at every
                # object alike" (enough for the mass loss above) does not satisfy.
                gap = mean_scores[b, negatives].logsumexp(0) - mean_scores[b, positions].logsumexp(0)
                self._losses.append(torch.nn.functional.softplus(gap + 1.0))
        return None

    def loss(self) -> torch.Tensor:
        """Mean over (sample, layer) of -log(attention mass on the targets); 0 if nothing was measured."""
        losses, self._losses = self._losses, []
        self.values = []
        self.negatives = []
        self.query = None  # the hooks stay silent until the next training batch sets it again
        return torch.stack(losses).mean() if losses else torch.zeros(())

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
