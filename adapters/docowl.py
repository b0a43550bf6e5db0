"""mPLUG-DocOwl 1.5 (model type `mplug_docowl`), as the stand-in in `mmreduce.eval.docowl` lays it out.

DocOwl expands each `<|image|>` placeholder (one per crop: the global image first, then the crops row by row) into
that crop's 257 H-Reducer features *inside* the model, before the LLM; so the text model sees a longer prompt than
`input_ids`, and its vision positions come from the `modality_indicators` (B, T') it receives (1 on vision features,
the `vit_eos` token included; 0 on text), not from placeholder ids. The decoder is modality-adaptive: each layer's
input and post-attention norms and its k and v projections have a text branch and a vision branch
(`MultiwayNetwork`, `.multiway[i]`) chosen per token by that indicator, so the indicators travel with the tokens at
every drop (`per_token_layer_kwargs`) and the scoring probe routes the norm and k projection per token.

Verified on the stand-in (tests/core/test_docowl.py and the invariant matrix of tests/core/test_invariants.py): the
vision mask is the 1s of `modality_indicators` (every crop's features, eos included, in placeholder order); the
probe equals the eager attention weights of a modality-adaptive layer whose text and vision branches differ (and
does not without the routing); invariants 1-3 of ARCHITECTURE §4 for every method under eager and sdpa, on a
left-padded batch of pages of 3, 2 and 5 crops: keep-all bit-identical, equal to a full-length masked eager reference
at prefill and at each decode step with and without a cache, each sample alone equal to the batch, beam search; and
a run at DocOwl 1.5's real widths (one ViT layer, two LLM layers: 1285 vision tokens for a 2x2 page).

Not verified, because real DocOwl 1.5 weights and code do not run on this transformers (its code needs 4.31 and
replaces transformers' Llama classes on import; mmreduce never loads remote code):
- module names: real DocOwl holds the LLM in the multimodal module itself (`model.model.layers`, `.embed_tokens`,
  `.norm`, with `.vision_model` and `.vision2text` beside them) and expands in the top model's `forward`; the stand-in
  (and this adapter) follows transformers 5's `model.model.language_model` layout. A port of real weights must rename
  `model.{layers,embed_tokens,norm}` to `model.language_model.*`; the names inside a layer are the same.
- branch routing: that branch 0 is text and 1 vision (as DocOwl's indicators read), that every vision feature,
  `vit_eos` included, is 1, and that decode steps are all 0, are the stand-in's reading of the public code.
- the eos token: whether real DocOwl's `vit_eos` should count as a vision token a method may drop (here it does,
  because its indicator is 1).
- batching: real DocOwl pads expanded rows of different lengths on the right and rebuilds an all-ones mask at each
  decode step (it was run one prompt at a time); the stand-in left-pads the expanded prompt and continues its mask.

Token layout (`token_layout`), in the text model's order (the expanded prompt's vision positions, the 1s of
`modality_indicators`, not `input_ids`: a placeholder there stands for a whole crop): each page's global image
(panel 0) then its crops (panel 1 + row * cols + col) in placeholder order, each as the H-Reducer's token grid
(32 x 8 at 448 px with 1x4: token (r, c) covers patch row r, patches 4c .. 4c+3) row-major, then its `vit_eos`
(panel END_OF_PANEL, `row` = the panel it closes). The crop grid comes from the processor's `patch_positions`
((row, col) of each crop, (9, 9) for the global image), which the inputs must hold; the pixels are `pixel_values`
rows in placeholder order. Positions to draw kept tokens with are those of the expanded prompt. `batch_token_layout`
(what the before-the-LLM stage reads) works without `patch_positions` too, which the model itself ignores: each
prompt's placeholders are then one page, global image first, crops in the processor's row-major order.

ViT (for before-the-LLM methods that read it): CLS first, attention modules `encoder.layers[i].self_attn` with one
fused `query_key_value` projection read per head as (S, H, 3, hd) (`vision_query_keys`); token (r, c) of a crop reads
patch row r, patches 4c .. 4c+3 (the 1x4 H-Reducer), and `vit_eos` reads none.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .base import END_OF_PANEL, ComposedVLMAdapter, ImageGrid, Panel, TokenCell

__all__ = ["DocOwlAdapter"]


class DocOwlAdapter(ComposedVLMAdapter):
    model_types = ("mplug_docowl",)
    vision_tower_name = "vision_model"
    expects = "the stand-in's DocOwlForConditionalGeneration"
    per_token_layer_kwargs = ("modality_indicators",)

    @classmethod
    def model_class(cls, config) -> type[nn.Module]:
        from mmreduce.eval.docowl import DocOwlConfig, DocOwlForConditionalGeneration

        if isinstance(config, DocOwlConfig):
            return DocOwlForConditionalGeneration
        raise ValueError(
            f"{type(config).__name__} is not the stand-in's DocOwlConfig: real mPLUG-DocOwl 1.5 checkpoints need their "
            "own code (written for transformers 4.31), which mmreduce never loads; load such a model yourself, "
            "deliberately, and pass it to mmreduce.wrap"
        )

    def vision_token_ids(self) -> tuple[int, ...]:
        """The `<|image|>` placeholder id (one per crop, expanded before the LLM; -200 in DocOwl)."""
        return (int(self.model.config.image_token_id),)

    def token_layout(self, inputs: dict) -> tuple[list[TokenCell], list[ImageGrid]]:
        """Per page of the first prompt: the global image (panel 0), then the crops, each crop's H-Reducer grid
        row-major and its `vit_eos` (END_OF_PANEL); in the text model's order. Needs `patch_positions` (the
        processor's third output) with the global images (ValueError otherwise): the overlays draw the crops where
        they are in the page."""
        if inputs.get("patch_positions") is None:
            raise ValueError("the DocOwl layout needs `patch_positions` (N, 2), the processor's (row, col) of each "
                             "crop and (9, 9) of each global image; add it to the inputs")
        return self._crop_layout(inputs, inputs["input_ids"][:1])

    def batch_token_layout(self, inputs: dict) -> tuple[list[TokenCell], list[ImageGrid]]:
        """`token_layout` of every prompt of the batch (pages numbered across it; `patch_positions` lists the crops
        of the whole batch in placeholder order). Without `patch_positions` (the model itself ignores them), each
        prompt's placeholders are read as one page: the first is the global image (panel 0), the k-th after it
        crop k (the processor's row-major order), `ImageGrid.crops` (0, 0) as the grid is unknown; pages of a
        multi-page prompt then share one image number, which per-panel methods do not see."""
        return self._crop_layout(inputs, inputs["input_ids"])

    def _crop_layout(self, inputs: dict, prompts: torch.Tensor) -> tuple[list[TokenCell], list[ImageGrid]]:
        """The layout of `prompts` (B, T), the first rows of `inputs["input_ids"]`; their crops are the first
        placeholders of the batch (and rows of `patch_positions` / `pixel_values`), in placeholder order."""
        config = self.model.config
        mask = inputs.get("attention_mask")
        placeholders = super().vision_mask(input_ids=prompts)  # (B, T)
        if mask is not None:
            placeholders &= mask[:prompts.shape[0]].bool()
        counts = placeholders.sum(dim=1).tolist()  # crops of each prompt
        positions = inputs.get("patch_positions")
        if positions is not None:
            positions = [tuple(int(v) for v in row) for row in torch.as_tensor(positions).view(-1, 2).tolist()]
            whole = prompts.shape[0] == inputs["input_ids"].shape[0]
            if len(positions) < sum(counts) or (whole and len(positions) != sum(counts)):
                raise ValueError(f"the prompts hold {sum(counts)} image placeholders but patch_positions lists "
                                 f"{len(positions)} crops")
        vision = config.vision_config
        rows, cols = config.hreducer_config.token_grid(vision.image_size // vision.patch_size)
        pages = []  # per page: placeholder indices over the batch, global image first
        first = 0
        for count in counts:
            members = list(range(first, first + count))
            first += count
            if not members:
                continue
            if positions is None:
                pages.append(members)
                continue
            glob = positions[members[0]]
            if glob == (0, 0):
                raise ValueError("the DocOwl layout needs each page's global image first (add_global_img), its "
                                 "position tells pages apart")
            for index in members:
                if positions[index] == glob:
                    pages.append([index])
                else:
                    pages[-1].append(index)
        cells: list[TokenCell] = []
        grids: list[ImageGrid] = []
        for image, members in enumerate(pages):
            if positions is None:
                panel_of = {index: panel for panel, index in enumerate(members)}
                crop_grid = (0, 0)
            else:
                crops = [positions[i] for i in members[1:]]
                grid_rows = 1 + max((r for r, _ in crops), default=-1)
                grid_cols = 1 + max((c for _, c in crops), default=-1)
                if len(crops) != grid_rows * grid_cols:
                    raise ValueError(f"page {image} has {len(crops)} crops for a {grid_rows} x {grid_cols} grid")
                panel_of = {members[0]: 0}
                panel_of.update({i: 1 + r * grid_cols + c for i, (r, c) in zip(members[1:], crops)})
                crop_grid = (grid_rows, grid_cols) if crops else (0, 0)
            for index in members:
                panel = panel_of[index]
                cells += [TokenCell(image, panel, r, c) for r in range(rows) for c in range(cols)]
                cells.append(TokenCell(image, END_OF_PANEL, panel, -1))
            by_panel = sorted((panel, index) for index, panel in panel_of.items())
            panels = tuple(Panel(rows, cols, index=(index,)) for _, index in by_panel)
            grids.append(ImageGrid(crop_grid, rows if rows == cols else 0, panels))
        return cells, grids

    # ---- the ViT, for before-the-LLM methods that read it -----------------------------------------------------
    def vision_query_keys(self, attention: nn.Module, hidden: torch.Tensor
                          ) -> tuple[torch.Tensor, torch.Tensor, float]:
        """The ViT's fused `query_key_value` read per head as the stand-in's attention reads it: (N, S, H, 3, hd),
        q, k and v of one head adjacent. Returns the CLS query (N, H, hd), every key (N, H, S, hd) and the scale."""
        batch, seq, _ = hidden.shape
        heads, head_dim = attention.num_heads, attention.head_dim
        fused = attention.query_key_value(hidden).view(batch, seq, heads, 3, head_dim)
        query = fused[:, 0, :, 0]  # (N, H, hd): the CLS token's query
        key = fused[:, :, :, 1].transpose(1, 2)  # (N, H, S, hd)
        return query, key, float(attention.scaling)

    def count_vision_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B,) vision tokens the LLM will see: placeholders x tokens per crop (257 at 448 px)."""
        return super().count_vision_tokens(input_ids) * self.model.config.tokens_per_crop

    def vision_mask(self, input_ids=None, inputs_embeds=None):
        """Placeholder positions in `input_ids`; None without ids (the placeholder id has no embedding). The engine
        takes the vision tokens from `text_vision_mask` anyway."""
        return super().vision_mask(input_ids=input_ids) if input_ids is not None else None

    def text_vision_mask(self, text_kwargs: dict[str, Any]) -> torch.Tensor | None:
        """`modality_indicators == 1` of the text model's arguments (B, T'); None when it got none."""
        indicators = text_kwargs.get("modality_indicators")
        return None if indicators is None else indicators == 1

    def query_and_keys(self, layer: nn.Module, hidden: torch.Tensor, query_index: torch.Tensor,
                       layer_kwargs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """The default projections with modality routing: every token's input norm and k projection go through
        its own branch (the query's norm through the query's branch; `q_proj` is shared)."""
        indicators = layer_kwargs.get("modality_indicators")
        attn = layer.self_attn
        batch, seq, _ = hidden.shape
        if indicators is not None:
            indicators = indicators.expand(batch, seq)
        rows = torch.arange(batch, device=hidden.device)
        normed = layer.input_layernorm(hidden, indicators)  # (B, T, D)
        query = attn.q_proj(normed[rows, query_index]).view(batch, -1, attn.head_dim)  # (B, H, hd)
        key = attn.k_proj(normed, indicators).view(batch, seq, -1, attn.head_dim)  # (B, T, Hkv, hd)
        return query, key
