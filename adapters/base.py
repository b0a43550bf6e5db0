"""What mmreduce needs to know about a model family, and nothing else.

The engine (`mmreduce.engine`) never asks "is this LLaVA?": it asks an adapter where the vision tokens are, which
modules are the decoder layers, and how to recompute one layer's attention row without eager attention.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from mmreduce.probe import apply_rotary, last_query_attention

__all__ = ["END_OF_PANEL", "NEWLINE", "ComposedVLMAdapter", "ImageGrid", "ModelAdapter", "Panel", "PatchPacking",
           "TokenCell"]

#: `TokenCell.panel` of a newline token (LLaVA-NeXT ends every feature row with one); its `row` is that feature row.
NEWLINE = -1
#: `TokenCell.panel` of a token that closes a panel and covers no pixels (DocOwl's `vit_eos` after each crop); its
#: `row` is the panel it closes.
END_OF_PANEL = -2


@dataclass(frozen=True)
class TokenCell:
    """Where one vision token of a prompt comes from: token-grid cell (row, col) of panel `panel` of image `image`.

    `image` counts the prompt's images and videos in prompt order. Panels: for an image, 0 is the whole image
    (LLaVA-1.5's image, LLaVA-NeXT's base image, a global image or thumbnail) and k >= 1 is crop or tile k
    (row-major); for a video laid out in frames (`ImageGrid.frames` > 0), panel k is temporal slice k. (row, col)
    index the panel's token grid (`Panel.rows` x `Panel.cols`), which need not be square nor match its pixel patches
    one to one. Tokens that cover no pixels have a negative panel: NEWLINE (`row` = the feature row it ends) and
    END_OF_PANEL (`row` = the panel it closes); their `col` is -1.
    """

    image: int
    panel: int
    row: int
    col: int


@dataclass(frozen=True)
class PatchPacking:
    """Pixels stored as flattened patches (Qwen2-VL): rows `start` .. `start + t*h*w` of the processor output, each
    row (channels, temporal_patch, patch, patch) of one patch, rows ordered (t, h/merge, w/merge, merge, merge) over
    the patch grid `grid` = (t, h, w); the panel is frame 0 of temporal slice `frame`."""

    start: int
    grid: tuple[int, int, int]
    patch: int
    merge: int
    temporal_patch: int
    frame: int = 0

    def unpack(self, flat: torch.Tensor) -> torch.Tensor:
        """(3, h*patch, w*patch) picture of slice `frame` from the whole flattened tensor."""
        t, h, w = self.grid
        m, p, tp = self.merge, self.patch, self.temporal_patch
        rows = flat[self.start:self.start + t * h * w]
        channels = rows.shape[1] // (tp * p * p)
        x = rows.reshape(t, h // m, w // m, m, m, channels, tp, p, p)
        x = x.permute(0, 6, 5, 1, 3, 7, 2, 4, 8).reshape(t, tp, channels, h * p, w * p)
        return x[self.frame, 0]


@dataclass(frozen=True)
class Panel:
    """One panel of an image: a `rows` x `cols` token grid laid evenly over a picture, and where that picture is in
    the processor outputs: `inputs[key][index]` (a (3, H, W) normalised picture), or, with `patches`, flattened
    patches of `inputs[key]` to unpack."""

    rows: int
    cols: int
    key: str = "pixel_values"
    index: tuple[int, ...] = ()
    patches: PatchPacking | None = None

    def pixels(self, inputs: dict) -> torch.Tensor:
        """(3, H, W) the panel's picture as the processor wrote it (normalised)."""
        if self.key not in inputs:
            raise ValueError(f"the inputs have no {self.key!r}; the panel's pixels are there")
        source = inputs[self.key]
        if self.patches is not None:
            return self.patches.unpack(source)
        return source[self.index]


@dataclass(frozen=True)
class ImageGrid:
    """The panels of one image (or video): `crops` (rows, cols) of crops or tiles, (0, 0) for a single panel; `side`
    token rows (= cols) per panel when the panels are square and alike, else 0; `panels` in panel order (panel 0
    first); `frames` > 0 for a video laid out as that many temporal slices (panels 0 .. frames - 1, `crops` (0, 0)).

    Without `panels` (square panels of `side` x `side` tokens), image i's panel k is `pixel_values[i]` when the grid
    has one panel and `pixel_values[i, k]` when it has crops (base image and crops stacked per image): see
    `panel_list`.
    """

    crops: tuple[int, int]
    side: int
    panels: tuple[Panel, ...] = ()
    frames: int = 0

    def panel_list(self, image: int) -> tuple[Panel, ...]:
        """The panels of this grid, image `image` of the prompt (the default packing when `panels` is empty)."""
        if self.panels:
            return self.panels
        rows, cols = self.crops
        if rows == 0:
            return (Panel(self.side, self.side, index=(image,)),)
        return tuple(Panel(self.side, self.side, index=(image, k)) for k in range(1 + rows * cols))


class ModelAdapter:
    """Base class for model-family adapters (one subclass per family, keyed by `config.model_type`).

    Subclasses set `model_types` and implement the four properties at the top; the Llama-style defaults below
    (attention probe, per-token kwargs) fit every decoder whose layers have `input_layernorm` and a `self_attn`
    with `q_proj`/`k_proj`, `head_dim` and rotate-half RoPE (Llama, Vicuna, Mistral, Qwen2, Qwen3).
    """

    model_types: ClassVar[tuple[str, ...]] = ()
    #: Decoder-layer keyword arguments holding one entry per token along dim 1, (B, T, ...), that the engine must
    #: gather with the hidden states at every drop (e.g. DocOwl's `modality_indicators`).
    per_token_layer_kwargs: ClassVar[tuple[str, ...]] = ()

    def __init__(self, model: nn.Module):
        self.model = model

    @classmethod
    def model_class(cls, config) -> type[nn.Module]:
        """The transformers class that loads a checkpoint of this family with `from_pretrained`."""
        from transformers import AutoModelForImageTextToText

        try:
            return AutoModelForImageTextToText._model_mapping[type(config)]
        except KeyError:
            raise ValueError(f"{cls.__name__} has no model class for {type(config).__name__}; override "
                             "ModelAdapter.model_class") from None

    # ---- family specifics -------------------------------------------------------------------------------------
    @property
    def multimodal_model(self) -> nn.Module:
        """The module that receives `input_ids` and merges vision features (its pre-hook finds the vision tokens)."""
        raise NotImplementedError

    @property
    def text_model(self) -> nn.Module:
        """The decoder stack (`forward(inputs_embeds=..., attention_mask=..., cache=...)`)."""
        raise NotImplementedError

    @property
    def vision_tower(self) -> nn.Module | None:
        """The vision encoder (timed separately in the stats); None when the family has none."""
        return None

    def vision_token_ids(self) -> tuple[int, ...]:
        """Token ids whose positions hold vision features after the merge."""
        raise NotImplementedError

    # ---- derived ----------------------------------------------------------------------------------------------
    @property
    def text_config(self):
        return self.text_model.config

    def decoder_layers(self) -> nn.ModuleList:
        return self.text_model.layers

    @property
    def num_layers(self) -> int:
        """Decoder layers of the language model."""
        return len(self.decoder_layers())

    def count_vision_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B,) vision tokens of each prompt in `input_ids` (B, T)."""
        return self.vision_mask(input_ids=input_ids).sum(dim=1)

    def text_vision_mask(self, text_kwargs: dict[str, Any]) -> torch.Tensor | None:
        """(B, T) vision mask read from the text model's own arguments, for families that expand their image
        placeholders before the text model (the multimodal module's `input_ids` then do not line up with the
        text model's tokens); None (the default) takes the mask from `vision_mask` on the multimodal inputs."""
        return None

    def token_layout(self, inputs: dict) -> tuple[list[TokenCell], list[ImageGrid]]:
        """Every vision token of a one-prompt `inputs` (processor outputs) in `input_ids` order (for a family that
        expands placeholders before the text model, in the text model's order), and each image's panel grid: what
        methods, stats and the demo's overlays use to map tokens to pixels. One cell per vision token."""
        raise NotImplementedError(f"{type(self).__name__} has no token layout for "
                                  f"{getattr(self.model.config, 'model_type', '?')}")

    def batch_token_layout(self, inputs: dict) -> tuple[list[TokenCell], list[ImageGrid]]:
        """`token_layout` for a whole batch of processor outputs: every vision token of every prompt, prompts in
        batch order, images numbered across the batch. The default is `token_layout` itself, right for families
        whose layout reads every image of the inputs; a family whose layout reads one prompt overrides it."""
        return self.token_layout(inputs)

    # ---- the vision tower, for before-the-LLM methods that read it -------------------------------------------
    #: Whether the tower's sequences start with a CLS token (its attention ranks patches).
    vision_has_cls: ClassVar[bool] = True

    def vision_attention_modules(self) -> list[nn.Module] | None:
        """The vision tower's self-attention modules, first layer first (pre-hooks on them read q/k); None when the
        family's tower is not understood. Default: CLIP-style `vision_tower.encoder.layers[i].self_attn`."""
        tower = self.vision_tower
        encoder = getattr(tower, "encoder", None) or getattr(getattr(tower, "vision_model", None), "encoder", None)
        layers = getattr(encoder, "layers", None) or getattr(encoder, "layer", None)
        if layers is None:
            return None
        modules = [getattr(layer, "self_attn", None) or getattr(layer, "attention", None) for layer in layers]
        return None if any(m is None for m in modules) else modules

    def vision_query_keys(self, attention: nn.Module, hidden: torch.Tensor
                          ) -> tuple[torch.Tensor, torch.Tensor, float]:
        """From a tower attention module's input (N, S, D): the first token's query (N, H, hd), every token's key
        (N, H, S, hd) and the logit scale, recomputed from the module's own projections (any attention
        implementation). Default: separate `q_proj` / `k_proj` (CLIP, SigLIP), optional `q_norm` / `k_norm`."""
        batch, seq, _ = hidden.shape
        heads = getattr(attention, "num_heads", None) or attention.config.num_attention_heads
        head_dim = getattr(attention, "head_dim", None) or hidden.shape[-1] // heads
        query = attention.q_proj(hidden[:, :1])
        key = attention.k_proj(hidden)
        if getattr(attention, "q_norm", None) is not None and not isinstance(attention.q_norm, nn.Identity):
            query, key = attention.q_norm(query), attention.k_norm(key)
        query = query.view(batch, heads, head_dim)  # (N, H, hd)
        key = key.view(batch, seq, heads, head_dim).transpose(1, 2)  # (N, H, S, hd)
        scale = getattr(attention, "scale", None) or getattr(attention, "scaling", None) or head_dim ** -0.5
        return query, key, float(scale)

    def tower_patch_grid(self) -> tuple[int, int]:
        """(rows, cols) of patches the tower sees per panel (CLS excluded)."""
        vision = self.model.config.vision_config
        size, patch = vision.image_size, vision.patch_size
        size = size if isinstance(size, (list, tuple)) else (size, size)
        patch = patch if isinstance(patch, (list, tuple)) else (patch, patch)
        return size[0] // patch[0], size[1] // patch[1]

    def logits_from_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., D) output of the last decoder layer -> (..., V) logits (final norm, then the LM head)."""
        return self.model.get_output_embeddings()(self.text_model.norm(hidden))

    def vision_mask(
        self, input_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        """(B, T) bool, True where a vision feature sits; None when it cannot be known (no ids, no embeddings).

        Without `input_ids`, a position is a vision position when its embedding equals the embedding of a vision
        token id (what the stock merge check does); merged features replace those embeddings only later.
        """
        ids = self.vision_token_ids()
        if input_ids is not None:
            mask = torch.zeros_like(input_ids, dtype=torch.bool)
            for token_id in ids:
                mask |= input_ids == token_id
            return mask
        if inputs_embeds is not None:
            table = self.text_model.get_input_embeddings()
            mask = torch.zeros(inputs_embeds.shape[:2], dtype=torch.bool, device=inputs_embeds.device)
            for token_id in ids:
                token = table(torch.tensor(token_id, device=inputs_embeds.device)).to(inputs_embeds.dtype)
                mask |= (inputs_embeds == token).all(-1)
            return mask
        return None

    def attention_probe(
        self,
        layer: nn.Module,
        hidden: torch.Tensor,
        query_index: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        key_valid: torch.Tensor,
        layer_kwargs: dict[str, Any] | None = None,
    ) -> torch.Tensor:
        """Attention probabilities of one query per sample over all keys, as `layer` would compute them.

        Recomputed from the layer's own input norm, q/k projections (and q/k norms if present) and RoPE, so it
        works whatever attention implementation runs the layer (sdpa, eager, flash).

        Args:
            layer: a decoder layer.
            hidden: (B, T, D) the layer's input hidden states.
            query_index: (B,) position in `hidden` of the query token of each sample.
            position_embeddings: (cos, sin), each (B or 1, T, head_dim), for the tokens of `hidden`.
            key_valid: (B, T) bool, keys that may be attended to (padding and dropped tokens are False).
            layer_kwargs: the other keyword arguments the layer receives for this stream (with the
                `per_token_layer_kwargs` gathered to it), for families whose projections depend on them.

        Returns:
            (B, H, T) float32 probabilities; keys after the query or invalid get 0.
        """
        batch = hidden.shape[0]
        rows = torch.arange(batch, device=hidden.device)
        query, key = self.query_and_keys(layer, hidden, query_index, layer_kwargs or {})
        cos, sin = (t.expand(batch, -1, -1) for t in position_embeddings)  # (B, T, hd)
        query = apply_rotary(query, cos[rows, query_index].unsqueeze(1), sin[rows, query_index].unsqueeze(1))
        key = apply_rotary(key.transpose(1, 2), cos.unsqueeze(1), sin.unsqueeze(1))  # (B, Hkv, T, hd)
        return last_query_attention(query, key, layer.self_attn.scaling, key_valid, query_index)

    def query_and_keys(self, layer: nn.Module, hidden: torch.Tensor, query_index: torch.Tensor,
                       layer_kwargs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """The probe's projections before RoPE, from the layer's own input norm and q/k projections (and q/k norms
        if present): the query token's query (B, H, hd) and every token's key (B, T, Hkv, hd). A family whose
        norms or projections depend on per-token arguments overrides this, not the whole probe."""
        attn = layer.self_attn
        batch, seq, _ = hidden.shape
        rows = torch.arange(batch, device=hidden.device)
        normed = layer.input_layernorm(hidden)  # (B, T, D)
        query = attn.q_proj(normed[rows, query_index]).view(batch, -1, attn.head_dim)  # (B, H, hd)
        key = attn.k_proj(normed).view(batch, seq, -1, attn.head_dim)  # (B, T, Hkv, hd)
        if getattr(attn, "q_norm", None) is not None:  # Qwen3-style per-head norms
            query, key = attn.q_norm(query), attn.k_norm(key)
        return query, key

    def gather_layer_kwargs(self, kwargs: dict, original_index: torch.Tensor) -> dict:
        """Per-token layer kwargs for a shortened stream.

        Args:
            kwargs: the decoder layer's kwargs at full prompt length (`position_embeddings` (cos, sin) each
                (B or 1, T, hd), `position_ids` (B or 1, T)).
            original_index: (B, T') indices into the full prompt of the tokens kept in the stream.

        Returns:
            The entries to replace: RoPE of the kept tokens at their *original* positions (gaps stay gaps), and
            every `per_token_layer_kwargs` entry gathered at the kept tokens.
        """
        out = {}
        batch = original_index.shape[0]
        for name in self.per_token_layer_kwargs:
            if kwargs.get(name) is not None:
                value = kwargs[name]
                out[name] = _gather_tokens(value.expand(batch, *value.shape[1:]), original_index)
        if kwargs.get("position_embeddings") is not None:
            out["position_embeddings"] = tuple(
                _gather_tokens(t.expand(batch, *t.shape[1:]), original_index) for t in kwargs["position_embeddings"]
            )
        position_ids = kwargs.get("position_ids")
        if position_ids is not None:
            if position_ids.dim() != 2:
                raise ValueError(
                    f"{type(self).__name__} expects 2-D position_ids (B, T), got shape {tuple(position_ids.shape)}; "
                    "a family with multi-axis positions needs its own adapter.gather_layer_kwargs"
                )
            out["position_ids"] = position_ids.expand(batch, -1).gather(1, original_index)
        return out


def _gather_tokens(tensor: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """tensor (B, T, ...) gathered along T with index (B, T') -> (B, T', ...)."""
    expanded = index.view(*index.shape, *([1] * (tensor.dim() - 2))).expand(*index.shape, *tensor.shape[2:])
    return tensor.gather(1, expanded)


class ComposedVLMAdapter(ModelAdapter):
    """A VLM whose inner `*Model` holds the decoder stack at `.language_model` and a vision tower (LLaVA, InternVL,
    Qwen2-VL, the DocOwl stand-in). Takes the whole model or its inner one, and refuses, with a `TypeError`, a model
    of another type or without those modules. Subclasses name the tower's attribute and the class they expect."""

    vision_tower_name: ClassVar[str] = "vision_tower"
    expects: ClassVar[str] = "the family's *ForConditionalGeneration"

    def __init__(self, model: nn.Module):
        super().__init__(model)
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in self.model_types:
            raise TypeError(
                f"{type(self).__name__} serves model type {' / '.join(repr(t) for t in self.model_types)}, but "
                f"{type(model).__name__} is {model_type!r}{self.wrong_type_hint(model_type)}; let wrap() choose the "
                "adapter from config.model_type, or pass one written for this family"
            )
        inner = model if hasattr(model, "language_model") else getattr(model, "model", None)
        if not hasattr(getattr(inner, "language_model", None), "layers") or not hasattr(inner, self.vision_tower_name):
            raise TypeError(
                f"{type(model).__name__} has no `.model.{self.vision_tower_name}` and `.model.language_model.layers`; "
                f"{type(self).__name__} expects {self.expects} (or its inner model)"
            )
        self._inner = inner

    def wrong_type_hint(self, model_type: str | None) -> str:
        """Extra advice for a model of `model_type` that this adapter does not serve ("" for none)."""
        return ""

    @property
    def multimodal_model(self) -> nn.Module:
        return self._inner

    @property
    def text_model(self) -> nn.Module:
        return self._inner.language_model

    @property
    def vision_tower(self) -> nn.Module | None:
        return getattr(self._inner, self.vision_tower_name, None)

