"""Greedy answer accuracy of a VLM on benchmark samples, and a masked random-drop reference.

    acc, preds = evaluate(model, processor, samples, batch_size=16)

`evaluate` runs `model.generate` (greedy, left padding), so a wrapped (reduced) model is measured the same way.
`random_vision_mask` masks a random share of the vision tokens as keys from one decoder layer on: the
full-length masked reference of dropping them there (ARCHITECTURE.md §4, invariant 2), available before the
core lands; it saves no compute.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterator, Sequence

import torch

from .benchmarks import Sample
from .tiny_models import prompt_for

__all__ = ["evaluate", "generate_answers", "normalize_answer", "random_vision_mask", "scored_vision_mask"]


def normalize_answer(text: str) -> str:
    """First word of a decoded answer, lower-cased, punctuation stripped ("" if nothing was generated)."""
    words = text.replace("</s>", " ").strip().split()
    return words[0].strip(".,:;!?").lower() if words else ""


def _batch_inputs(processor, samples: Sequence[Sample]):
    prompts = [prompt_for(processor, s.question, num_images=len(s.images)) for s in samples]
    images = [img for s in samples for img in s.images]
    return processor(images=images, text=prompts, return_tensors="pt", padding=True)


@torch.inference_mode()
def generate_answers(model, processor, samples: Sequence[Sample], batch_size: int = 16,
                     max_new_tokens: int = 3, progress: bool = False) -> list[str]:
    """Greedy answers (normalised) for `samples`, `batch_size` at a time, prompts left-padded."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens!r}")
    if getattr(processor, "tokenizer", None) is not None and processor.tokenizer.padding_side != "left":
        raise ValueError("processor.tokenizer.padding_side must be 'left' for batched generation")
    from tqdm.auto import tqdm

    answers: list[str] = []
    starts = range(0, len(samples), batch_size)
    for start in tqdm(starts, desc="eval", disable=not progress, leave=False):
        batch = samples[start:start + batch_size]
        inputs = _batch_inputs(processor, batch)
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=processor.tokenizer.pad_token_id)
        new = out[:, inputs["input_ids"].shape[1]:]  # (B, new) generated ids only
        answers += [normalize_answer(t) for t in processor.tokenizer.batch_decode(new, skip_special_tokens=True)]
    return answers


def evaluate(model, processor, samples: Sequence[Sample], batch_size: int = 16, max_new_tokens: int = 3,
             progress: bool = False) -> tuple[float, list[str]]:
    """(accuracy in [0, 1], predicted answers) of greedy generation on `samples`."""
    if len(samples) == 0:
        raise ValueError("samples must not be empty")
    predictions = generate_answers(model, processor, samples, batch_size, max_new_tokens, progress)
    correct = sum(p == s.answer for p, s in zip(predictions, samples))
    return correct / len(samples), predictions


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
    """`scored_vision_mask` with a uniformly random choice per sample (seeded): the `random` method's reference.

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
