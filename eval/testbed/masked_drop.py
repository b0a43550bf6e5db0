"""Masked token dropping for the testbed's quality bars: the keys of dropped vision tokens are masked from one
decoder layer on, at full length (same maths as dropping them, no speed-up).

    with random_vision_mask(model, keep_ratio=0.25, layer=2, seed=0):
        accuracy, _ = evaluate(model, processor, samples)

`random_vision_mask` draws one `torch.randperm` per sample from a single generator for the whole block, so a
sample's draw depends on the samples before it. That is not the seeding of the `random` method (which seeds each
sample from its own tokens); the "random 25% from layer 2" figures in docs/TRAINING.md were measured with this
function and are reproduced by it. `scored_vision_mask` takes any score, e.g. the oracle of `tiny_quality`.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterator

import torch

__all__ = ["random_vision_mask", "scored_vision_mask"]


def _decoder_layers(model) -> torch.nn.ModuleList:
    inner = getattr(model, "model", model)
    language_model = getattr(inner, "language_model", inner)
    return language_model.layers


ScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@contextlib.contextmanager
def scored_vision_mask(model, keep_ratio: float, layer: int, score_fn: ScoreFn) -> Iterator[None]:
    """Within the block, layers >= `layer` attend only to the top-scored `keep_ratio` share of vision tokens.

    `score_fn(input_ids, vision)` gets the prompt ids (B, T) and the vision mask (B, T) at prefill and returns
    (B, T) scores; per sample the ceil(keep_ratio * n_vision) best-scored vision positions stay visible. The keys
    of the others are masked in every layer from `layer` on, at prefill and at every decode step; layers below
    `layer` see everything. This is the full-length masked reference of dropping them (same maths, no speed-up).
    """
    if not 0.0 < keep_ratio <= 1.0:
        raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio!r}")
    layers = _decoder_layers(model)
    if not 0 <= layer < len(layers):
        raise ValueError(f"layer must be in [0, {len(layers)}), got {layer!r}")
    image_token_id = model.config.image_token_id
    state: dict[str, torch.Tensor] = {}

    def capture(module, args, kwargs):
        input_ids = kwargs.get("input_ids")
        if input_ids is None or not (input_ids == image_token_id).any():
            return None  # decode step: keep the prefill's drop mask (the cache keeps growing after it)
        vision = input_ids == image_token_id  # (B, T)
        scores = score_fn(input_ids, vision)  # (B, T)
        dropped = torch.zeros_like(vision)
        for b in range(vision.shape[0]):
            positions = vision[b].nonzero().squeeze(1)  # (n_vision,)
            n_keep = math.ceil(round(keep_ratio * positions.numel(), 6))
            order = torch.sort(scores[b, positions], descending=True, stable=True).indices  # ties: earlier first
            dropped[b, positions[order[n_keep:]]] = True
        state["dropped"] = dropped
        return None

    def mask_layer(module, args, kwargs):
        dropped = state.get("dropped")
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        if dropped is None or hidden is None:
            return None
        batch, q_len = hidden.shape[:2]
        mask = kwargs.get("attention_mask")
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        past = cache.get_seq_length(module.self_attn.layer_idx) if cache is not None else 0
        k_len = mask.shape[-1] if mask is not None else past + q_len
        if mask is None:  # sdpa skipped the mask (causal, no padding): build the causal one explicitly
            q_pos = torch.arange(k_len - q_len, k_len)[:, None]
            mask = (torch.arange(k_len)[None, :] <= q_pos)[None, None].expand(batch, 1, q_len, k_len)
        keys_dropped = torch.zeros(batch, k_len, dtype=torch.bool)
        keys_dropped[:, : dropped.shape[1]] = dropped  # later keys (generated tokens) are never dropped
        keys_dropped = keys_dropped[:, None, None, :].to(mask.device)  # (B, 1, 1, K)
        if mask.dtype == torch.bool:
            mask = mask & ~keys_dropped
        else:
            mask = mask.masked_fill(keys_dropped, torch.finfo(mask.dtype).min)
        kwargs["attention_mask"] = mask
        return args, kwargs

    handles = [model.register_forward_pre_hook(capture, with_kwargs=True)]
    handles += [layers[i].register_forward_pre_hook(mask_layer, with_kwargs=True) for i in range(layer, len(layers))]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def random_vision_mask(model, keep_ratio: float, layer: int = 2, seed: int = 0):
    """`scored_vision_mask` with a uniformly random choice per sample, drawn from one seeded generator.

    Per sample, a `torch.randperm` of its vision positions (one generator for the whole block) is drawn and
    the first ceil(keep_ratio * n_vision) of it are kept.
    """
    generator = torch.Generator().manual_seed(seed)

    def score(input_ids: torch.Tensor, vision: torch.Tensor) -> torch.Tensor:
        scores = torch.zeros(vision.shape, dtype=torch.float32)  # (B, T)
        for b in range(vision.shape[0]):
            positions = vision[b].nonzero().squeeze(1)
            order = torch.randperm(positions.numel(), generator=generator)
            scores[b, positions[order]] = torch.arange(positions.numel(), 0, -1, dtype=torch.float32)
        return scores

    return scored_vision_mask(model, keep_ratio, layer, score)
