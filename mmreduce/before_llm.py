"""The before-the-LLM stage: what the engine does with a `BeforeLLMMethod` at the text model's door.

The stock forward computes the image features and writes them into the prompt's placeholders as usual; a pre-hook on
the text model then shortens its inputs: the merged embeddings (B, T, D) become (B, T', D), and the attention mask
(left padding redone), the position ids (packed or original) and the family's per-token arguments follow. Because the
rewrite happens after the family's own merge, no placeholder check, tile count or rope index needs to change, and
`generate()` keeps counting the caller's `input_ids`; decode steps get the matching mask and positions. Vision-tower
signals (CLS attention, keys) come from pre-hooks on the tower's attention modules, recomputed from their q/k
projections, so the tower keeps its own attention implementation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .methods.before import BeforeLLMMethod, SignalRequest, TokenPlan, VisionTokens

__all__ = ["BeforeRecord", "POSITION_MODES", "TowerProbe", "plan_batch", "rewrite_decode", "rewrite_prefill"]

#: "original": kept tokens keep the positions they had in the full prompt (gaps stay gaps, as the in-LLM stages do);
#: "packed": positions count the shortened prompt, as if the caller had sent it (what the papers do).
POSITION_MODES = ("original", "packed")


@dataclass
class BeforeRecord:
    """What the before-the-LLM stage did to one prefill, for its decode steps and for mapping outputs back.

    Attributes:
        length: T, the prompt length the caller's forward produced.
        gather: (B, T') index into T of every slot of the shortened prompt (filler slots repeat a kept index).
        valid: (B, T') bool, False on filler slots (left padding of shorter rows).
        removed: (B,) real prompt tokens each row lost (what packed decode positions subtract).
        positions: one of POSITION_MODES.
    """

    length: int
    gather: torch.Tensor
    valid: torch.Tensor
    removed: torch.Tensor
    positions: str

    @property
    def new_length(self) -> int:
        return self.gather.shape[1]

    def to_caller(self, index: torch.Tensor) -> torch.Tensor:
        """(B, K) positions in the shortened prompt -> (B, K) positions in the caller's prompt."""
        return self.gather.gather(1, index)


class TowerProbe:
    """Pre-hooks on the vision tower's attention modules that record, per tower row (one image, crop, tile or
    frame), the CLS query's attention to every patch (mean over heads) and the patch keys (mean over heads)."""

    def __init__(self, adapter, requests: list[SignalRequest]):
        modules = adapter.vision_attention_modules()
        kinds = sorted({r.kind for r in requests})
        if modules is None:
            raise ValueError(f"{type(adapter).__name__} cannot read its vision tower's attention, which "
                             f"{'/'.join(kinds)} scoring needs; use pool, stride or tome (metric=features) on this "
                             "family")
        if "cls_attention" in kinds and not adapter.vision_has_cls:
            raise ValueError(f"the vision tower of {type(adapter).__name__} has no CLS token, so there is no CLS "
                             "attention to rank by; use pool, stride or tome (metric=features) on this family")
        self.adapter, self.modules = adapter, modules
        self.layers: dict[int, set[str]] = {}
        for request in requests:
            layer = request.layer if request.layer >= 0 else len(modules) + request.layer
            if not 0 <= layer < len(modules):
                raise ValueError(f"vision-tower layer {request.layer} is out of range for a tower of "
                                 f"{len(modules)} layers")
            self.layers.setdefault(layer, set()).add(request.kind)
        self.requests = requests
        self.signals: dict[str, torch.Tensor] = {}
        self._handles: list = []

    def install(self) -> None:
        for layer in self.layers:
            self._handles.append(self.modules[layer].register_forward_pre_hook(self._hook(layer), with_kwargs=True))

    def remove(self) -> None:
        while self._handles:
            self._handles.pop().remove()

    def _hook(self, layer: int):
        def hook(module: nn.Module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]  # (N, S, D)
            with torch.no_grad():
                query, keys, scale = self.adapter.vision_query_keys(module, hidden)  # (N, H, hd), (N, H, S, hd)
                start = 1 if self.adapter.vision_has_cls else 0
                if "cls_attention" in self.layers[layer]:
                    logits = torch.einsum("nhd,nhsd->nhs", query.float(), keys.float()) * scale  # (N, H, S)
                    attention = logits.softmax(dim=-1).mean(dim=1)  # (N, S)
                    self.signals[f"cls_attention@{layer}"] = attention[:, start:]  # (N, P)
                if "keys" in self.layers[layer]:
                    self.signals[f"keys@{layer}"] = keys.float().mean(dim=1)[:, start:]  # (N, P, hd)
            return None

        return hook

    def resolved(self, request: SignalRequest) -> str:
        layer = request.layer if request.layer >= 0 else len(self.modules) + request.layer
        return f"{request.kind}@{layer}"


def token_signals(probe: TowerProbe, adapter, cells: list, grids: list) -> dict[str, torch.Tensor]:
    """Per-token signals for every vision token of the caller's batch, in prompt order.

    Each token (image, panel, row, col) covers the patches of its tower row that lie under its cell when the panel's
    token grid is laid evenly over the tower's patch grid; CLS attention is summed over those patches, keys averaged.

    Returns: `SignalRequest.key` -> (N_tokens,) or (N_tokens, C).
    """
    patch_rows, patch_cols = adapter.tower_patch_grid()
    rows_of: dict[tuple[int, int], int] = {}
    for cell in cells:
        if cell.panel >= 0 and (cell.image, cell.panel) not in rows_of:
            rows_of[(cell.image, cell.panel)] = len(rows_of)
    boxes = _patch_boxes(cells, grids, rows_of, patch_rows, patch_cols)  # (N_tokens, 5)
    out: dict[str, torch.Tensor] = {}
    for request in probe.requests:
        recorded = probe.signals.get(probe.resolved(request))
        if recorded is None:
            raise ValueError(f"the vision tower did not run before the prompt reached the text model, so there is "
                             f"no {request.kind} to rank by; pass pixel inputs to the same call")
        if recorded.shape[0] != len(rows_of):
            raise ValueError(f"the vision tower saw {recorded.shape[0]} panels but the prompt lays out "
                             f"{len(rows_of)}; mmreduce cannot match tower rows to tokens for this input")
        grid = recorded.view(recorded.shape[0], patch_rows, patch_cols, -1).double()  # (N, Pr, Pc, C)
        # Box sums from an integral image: exact in float64 for these sizes, and one gather for every token.
        integral = F.pad(grid.cumsum(1).cumsum(2), (0, 0, 1, 0, 1, 0))  # (N, Pr + 1, Pc + 1, C)
        row, r0, r1, c0, c1 = boxes.to(grid.device).unbind(1)  # (N_tokens,) each
        at = row.clamp(min=0)
        total = integral[at, r1, c1] - integral[at, r0, c1] - integral[at, r1, c0] + integral[at, r0, c0]
        if request.kind == "keys":
            total = total / ((r1 - r0) * (c1 - c0)).clamp(min=1)[:, None]
        stacked = total.masked_fill((row < 0)[:, None], 0.0).to(recorded.dtype)  # (N_tokens, C)
        out[request.key] = stacked[:, 0] if request.kind == "cls_attention" else stacked
    return out


def _patch_boxes(cells: list, grids: list, rows_of: dict, patch_rows: int, patch_cols: int) -> torch.Tensor:
    """(N_tokens, 5) long: each token's tower row and the patch box [r0, r1) x [c0, c1) under its cell when the
    panel's token grid is laid evenly over the patch grid (at least one patch); tower row -1 for tokens that cover
    no pixels."""
    boxes = []
    for cell in cells:
        if cell.panel < 0:
            boxes.append((-1, 0, 1, 0, 1))
            continue
        panel = grids[cell.image].panel_list(cell.image)[cell.panel]
        r0, c0 = cell.row * patch_rows // panel.rows, cell.col * patch_cols // panel.cols
        r1 = max(r0 + 1, (cell.row + 1) * patch_rows // panel.rows)
        c1 = max(c0 + 1, (cell.col + 1) * patch_cols // panel.cols)
        boxes.append((rows_of[(cell.image, cell.panel)], r0, r1, c0, c1))
    return torch.tensor(boxes, dtype=torch.long).view(-1, 5)


def plan_batch(method: BeforeLLMMethod, embeds: torch.Tensor, vision: torch.Tensor, cells: list | None,
               signals: dict[str, torch.Tensor], seeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """Runs `method` on every row of a batch.

    Args:
        embeds: (B, T, D) the text model's input embeddings.
        vision: (B, T) bool vision positions (padding excluded).
        cells: per row, one TokenCell per vision token (None where the layout is unknown).
        signals: per row, `SignalRequest.key` -> (n_b, ...) tensors.
        seeds: (B,) per-sample seeds.

    Returns:
        keep: (B, T) bool vision tokens that stay; embeds: (B, T, D) with merged tokens written at their positions;
        extra FLOPs per row.
    """
    keep = torch.zeros_like(vision)
    out = embeds.clone()
    extra: list[float] = []
    for row in range(embeds.shape[0]):
        positions = vision[row].nonzero().flatten()  # (n,)
        if positions.numel() == 0:
            extra.append(0.0)
            continue
        tokens = VisionTokens(embeds[row, positions], cells[row] if cells is not None else None,
                              signals[row] if signals else {}, int(seeds[row]))
        plan: TokenPlan = method.plan_sample(tokens)
        merged = plan.apply(tokens.features)  # (k, D)
        kept = positions[plan.keep.to(positions.device)]
        keep[row, kept] = True
        out[row, kept] = merged.to(out.dtype)
        extra.append(plan.extra_flops)
    return keep, out, extra


def rewrite_prefill(kwargs: dict, embeds: torch.Tensor, keep_all: torch.Tensor, gather: torch.Tensor,
                    valid: torch.Tensor, input_mask: torch.Tensor, positions: str,
                    per_token: tuple[str, ...]) -> tuple[dict, BeforeRecord]:
    """The text model's prefill kwargs for the shortened prompt.

    Args:
        kwargs: the text model's kwargs (`inputs_embeds` (B, T, D), `attention_mask` (B, T), `position_ids`
            (B or 1, T) or (A, B, T) for multi-axis RoPE, or None).
        embeds: (B, T, D) embeddings with merged tokens written in.
        keep_all: (B, T) bool tokens that stay (text and kept vision tokens).
        gather, valid: (B, T') from the engine's compaction of `keep_all`.
        input_mask: (B, T) bool, the prompt's 2-D mask.
        positions: one of POSITION_MODES.
        per_token: kwargs holding one entry per token along dim 1 (gathered too).
    """
    batch, length = keep_all.shape
    new = dict(kwargs)
    new["inputs_embeds"] = embeds.gather(1, gather[..., None].expand(-1, -1, embeds.shape[-1]))  # (B, T', D)
    mask = kwargs.get("attention_mask")
    new["attention_mask"] = valid.to(mask.dtype if mask is not None else torch.long)
    position_ids = kwargs.get("position_ids")
    if positions == "original":
        if position_ids is None:
            position_ids = torch.arange(length, device=embeds.device)[None]
        axes = position_ids.shape[:-2]  # () or (A,)
        full = position_ids.expand(*axes, batch, length)
        new["position_ids"] = full.gather(-1, gather.expand(*axes, *gather.shape))  # (..., B, T')
    elif position_ids is not None:
        if position_ids.dim() != 2:
            raise ValueError("positions='packed' is defined for one position axis; this family passes "
                             f"{tuple(position_ids.shape)} position ids (multi-axis RoPE): use positions='original'")
        new["position_ids"] = (valid.long().cumsum(1) - 1).clamp(min=0)
    for name in per_token:
        value = kwargs.get(name)
        if value is not None and value.dim() >= 2 and value.shape[1] == length:
            index = gather.view(*gather.shape, *([1] * (value.dim() - 2))).expand(*gather.shape, *value.shape[2:])
            new[name] = value.expand(batch, *value.shape[1:]).gather(1, index)
    removed = input_mask.sum(1) - valid.sum(1)
    return new, BeforeRecord(length, gather, valid, removed, positions)


def rewrite_decode(kwargs: dict, record: BeforeRecord, cached: int) -> dict:
    """A decode step's text-model kwargs for a cache that holds the shortened prompt.

    Args:
        kwargs: the step's kwargs (`attention_mask` (B, T + steps) over the caller's sequence, `position_ids`).
        record: the prefill's record.
        cached: tokens in the cache before this step (shortened prompt + earlier steps).
    """
    new = dict(kwargs)
    mask = kwargs.get("attention_mask")
    if mask is not None and mask.dim() == 2 and mask.shape[1] > record.length:
        new["attention_mask"] = torch.cat([record.valid.to(mask.dtype), mask[:, record.length:]], dim=1)
    position_ids = kwargs.get("position_ids")
    step = kwargs["inputs_embeds"].shape[1] if kwargs.get("inputs_embeds") is not None else 1
    if record.positions == "packed":
        if position_ids is not None:
            new["position_ids"] = position_ids - record.removed.to(position_ids.device)[:, None]
    elif position_ids is None:
        past = cached + record.length - record.new_length  # what the cache would hold unreduced
        new["position_ids"] = torch.arange(past, past + step, device=record.valid.device)[None]
    return new
