"""An independent reference for in-LLM token dropping: full length, eager attention, dropped keys masked.

Nothing here imports the engine. Every layer runs over the whole prompt; from a drop's apply layer on, the dropped
vision tokens are masked out as keys (a 4-D additive mask), which is the same mathematics as removing them, without
the saving. Rankings come from the eager attention weights the model itself returns.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch

__all__ = ["assert_matches_reference", "dropped_from_kept", "eager", "masked_forward", "masked_greedy", "reference_selection", "text_view",
           "vision_positions"]

# Inputs with one entry per prompt token besides input_ids / attention_mask: Qwen2-VL's modality of each token
# (0 text, 1 image, 2 video); a generated token is text (0), as `generate()` extends them.
PER_TOKEN_INPUTS = ("mm_token_type_ids",)


@contextmanager
def eager(model):
    """Runs `model` with eager attention inside the block (its weights are then returned), restoring it after."""
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


def _layers(model):
    return model.model.language_model.layers


def vision_positions(inputs: dict, vision_ids) -> torch.Tensor:
    """(B, T) bool: real (non-padding) prompt positions holding one of `vision_ids` (an id or a collection of ids,
    e.g. Qwen2-VL's image and video pads); a (B, T) bool tensor is taken as those positions (see `text_view`)."""
    if isinstance(vision_ids, torch.Tensor) and vision_ids.dtype == torch.bool:
        return vision_ids
    ids = torch.tensor([vision_ids] if isinstance(vision_ids, int) else sorted(vision_ids))
    return torch.isin(inputs["input_ids"], ids) & inputs["attention_mask"].bool()


def text_view(model, inputs: dict, vision_ids) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompt as the text model sees it: (B, T) bool attention mask and (B, T) bool vision positions.

    The inputs' own mask and `vision_positions(inputs, vision_ids)`, unless the family's adapter reads the vision
    tokens from the text model's arguments (`text_vision_mask`: DocOwl expands each image placeholder into many
    features before its LLM, so T is longer than `input_ids`); then both come from one stock forward, as the text
    model receives them.
    """
    from mmreduce.adapters import get_adapter

    adapter, seen = get_adapter(model), {}

    def hook(module, args, kwargs):
        seen.update(mask=kwargs.get("attention_mask"), vision=adapter.text_vision_mask(kwargs))

    handle = model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs, use_cache=False)
    finally:
        handle.remove()
    if seen.get("vision") is None:
        return inputs["attention_mask"].bool(), vision_positions(inputs, vision_ids)
    return seen["mask"].bool(), seen["vision"].bool() & seen["mask"].bool()


def _additive_mask(input_mask: torch.Tensor, dropped: torch.Tensor, dtype) -> torch.Tensor:
    """(B, 1, T, T): 0 where query q may see key k (k <= q, k real, k not dropped), else the dtype's minimum."""
    length = input_mask.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    allowed = causal[None] & input_mask.bool()[:, None, :] & ~dropped[:, None, :]
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)[:, None]


def masked_forward(model, inputs: dict, dropped_from: dict[int, torch.Tensor], capture_layer: int | None = None):
    """Full-length forward; `dropped_from[l]` (B, T) bool = keys masked in layers >= l (cumulative by the caller).
    T and the padding are those of the 2-D mask the text model receives (longer than `input_ids` where the family
    expands its image placeholders before the LLM).

    Returns (logits (B, T, V), attention weights (B, H, T, T) of `capture_layer` or None).
    """
    captured = {"input_mask": inputs["attention_mask"]}
    handles = []
    starts = sorted(dropped_from)

    def text_hook(module, args, kwargs):
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.dim() == 2:
            captured["input_mask"] = mask

    def pre_hook(layer_idx):
        def hook(module, args, kwargs):
            active = [s for s in starts if s <= layer_idx]
            if not active:
                return None
            hidden = args[0] if args else kwargs["hidden_states"]
            kwargs["attention_mask"] = _additive_mask(captured["input_mask"], dropped_from[active[-1]], hidden.dtype)
            return args, kwargs

        return hook

    def attn_hook(module, args, output):
        captured["weights"] = output[1]

    handles.append(model.model.language_model.register_forward_pre_hook(text_hook, with_kwargs=True))
    for layer_idx, layer in enumerate(_layers(model)):
        handles.append(layer.register_forward_pre_hook(pre_hook(layer_idx), with_kwargs=True))
    if capture_layer is not None:
        handles.append(_layers(model)[capture_layer].self_attn.register_forward_hook(attn_hook))
    try:
        with eager(model), torch.no_grad():
            logits = model(**inputs, use_cache=False).logits
    finally:
        for handle in handles:
            handle.remove()
    return logits, captured.get("weights")


def reference_selection(model, inputs: dict, stages: list[dict], vision_ids):
    """Re-derives each stage's kept vision tokens from eager attention, one full forward per stage.

    `stages`: dicts with score_layer, apply_layer and one of ratio (of the surviving vision tokens), fraction (of
    the sample's initial ones) or count (absolute), as the method defines its drops.
    `vision_ids`: the vision token id, or a collection of them (see `vision_positions`).
    Query = the last prompt position (T - 1, prompts are left padded). Ties -> earlier position.

    Returns {apply_layer: (B, T) bool dropped-from-here mask}, {apply_layer: per-sample sorted kept positions}.
    """
    vision = vision_positions(inputs, vision_ids)
    initial = vision.sum(dim=1)
    dropped = torch.zeros_like(vision)
    dropped_from, kept_positions = {}, {}
    for stage in stages:
        _, weights = masked_forward(model, inputs, dict(dropped_from), capture_layer=stage["score_layer"])
        scores = weights[:, :, -1, :].float().mean(dim=1)  # (B, T): last prompt token, mean over heads
        new_dropped = dropped.clone()
        kept_rows = []
        for row in range(vision.shape[0]):
            surviving = [i for i in range(vision.shape[1]) if vision[row, i] and not dropped[row, i]]
            if "ratio" in stage:
                keep = math.ceil(stage["ratio"] * len(surviving) - 1e-9)
            elif "fraction" in stage:
                keep = math.ceil(stage["fraction"] * int(initial[row]) - 1e-9)
            else:
                keep = stage["count"]
            keep = min(keep, len(surviving))
            ranked = sorted(surviving, key=lambda i: (-float(scores[row, i]), i))
            kept = sorted(ranked[:keep])
            for i in surviving:
                if i not in kept:
                    new_dropped[row, i] = True
            kept_rows.append(kept)
        if bool((new_dropped != dropped).any()):
            dropped = new_dropped
            dropped_from[stage["apply_layer"]] = dropped.clone()
            kept_positions[stage["apply_layer"]] = kept_rows
    return dropped_from, kept_positions


def dropped_from_kept(inputs: dict, kept_positions: dict[int, list[list[int]]], vision_ids):
    """The reference's dropped masks from a given selection (per apply layer, per sample kept positions)."""
    vision = vision_positions(inputs, vision_ids)
    dropped_from = {}
    for layer, rows in kept_positions.items():
        dropped = vision.clone()
        for row, kept in enumerate(rows):
            dropped[row, kept] = False
        dropped_from[layer] = dropped
    return dropped_from


def masked_greedy(model, inputs: dict, dropped_from: dict[int, torch.Tensor], steps: int, suppress=None):
    """Greedy decoding by full recomputation each step; prompt tokens dropped as given, new tokens never dropped.
    `suppress`: token ids never chosen; by default the model's `generation_config.suppress_tokens`, as `generate()`
    does (the test models suppress their vision placeholders). Per-token inputs (`PER_TOKEN_INPUTS`) grow with
    text entries (0) for the new tokens.

    Returns (new tokens (B, steps), per-step last-position logits list of (B, V)).
    """
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    if suppress is None:
        suppress = model.generation_config.suppress_tokens or ()
    extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    tokens, step_logits = [], []
    for step in range(steps):
        grown = {layer: torch.cat([d, torch.zeros(d.shape[0], step, dtype=torch.bool)], 1)
                 for layer, d in dropped_from.items()}
        logits, _ = masked_forward(model, {"input_ids": ids, "attention_mask": mask, **extra}, grown)
        last = logits[:, -1, :]
        step_logits.append(last)
        token = last.clone().index_fill_(1, torch.tensor(list(suppress), dtype=torch.long), float("-inf"))
        token = token.argmax(dim=-1, keepdim=True)
        tokens.append(token)
        ids = torch.cat([ids, token], dim=1)
        mask = torch.cat([mask, torch.ones_like(token)], dim=1)
        for key in PER_TOKEN_INPUTS:
            if key in extra:
                extra[key] = torch.cat([extra[key], torch.zeros_like(token, dtype=extra[key].dtype)], dim=1)
    return torch.cat(tokens, dim=1), step_logits


def assert_matches_reference(model, batch: dict, logits: torch.Tensor, runs, dropped_from: dict[int, torch.Tensor],
                             input_mask: torch.Tensor, steps: int) -> None:
    """A reduced prefill's `logits` (B, T, V) and greedy `runs` (generate outputs with `.sequences` and `.logits`,
    e.g. cached and cache-free) equal the masked reference of `dropped_from`, at every position that reaches the last
    layer and at every decode step; and the reduction changed the output (else every check could pass on a no-op)."""
    reference_logits, _ = masked_forward(model, batch, dropped_from)
    reaching = input_mask & ~dropped_from[max(dropped_from)]  # positions that reach the last layer
    assert torch.allclose(logits[reaching], reference_logits[reaching], atol=1e-5, rtol=0)
    reference_tokens, reference_steps = masked_greedy(model, batch, dropped_from, steps)
    for run in runs:
        assert torch.equal(run.sequences[:, -steps:], reference_tokens)
        for step_logits, reference_step in zip(run.logits, reference_steps):
            assert torch.allclose(step_logits, reference_step, atol=1e-5, rtol=0)
    with torch.no_grad():
        assert (model(**batch).logits[:, -1] - logits[:, -1]).abs().max() > 1e-3, "the reduction changed nothing"
