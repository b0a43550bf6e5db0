"""ARCHITECTURE §4 invariants 1-5 for every adapter, method and attention implementation.

Every comparison is against something the engine does not compute: the stock model, an eager full-length masked
reference (tests/_masked_reference.py), or the same sample run alone.
"""

from __future__ import annotations

import pytest
import torch

import mmreduce
from _masked_reference import dropped_from_kept, masked_forward, masked_greedy, reference_selection
from _vlm_factory import IMAGE_TOKEN, llava_batch, llava_next_batch, select_samples, tiny_llava, tiny_llava_next

LAYERS = 6
ADAPTERS = ["llava", "llava_next"]
ATTENTION = ["sdpa", "eager"]

# name -> (wrap kwargs, reference stages (None: take the engine's selection, for seeded random methods))
METHODS = {
    "fastv": (dict(layer=2, keep_ratio=0.25), [dict(score_layer=1, apply_layer=2, ratio=0.25)]),
    "pdrop": (dict(keep_ratio=0.5), [dict(score_layer=layer, apply_layer=layer, ratio=0.5) for layer in (2, 3, 4)]),
    "schedule": (
        dict(keep=[1.0, 1.0, 0.5, 0.5, 0.25, 0.25]),
        [dict(score_layer=2, apply_layer=2, fraction=0.5), dict(score_layer=4, apply_layer=4, fraction=0.25)],
    ),
    "random": (dict(layer=3, keep_ratio=0.3, seed=7), None),
}
KEEP_ALL = {
    "fastv": dict(layer=1, keep_ratio=1.0),
    "pdrop": dict(layers=(1, 3, 5), keep_ratio=1.0),
    "schedule": dict(keep=[1.0] * LAYERS),
    "random": dict(layer=1, keep_ratio=1.0),
}


def build(adapter: str, attn: str):
    if adapter == "llava":
        model = tiny_llava(attn, layers=LAYERS)
        return model, llava_batch()
    model = tiny_llava_next(attn, layers=LAYERS)
    return model, llava_next_batch(model)


@pytest.fixture(scope="module", params=[(a, b) for a in ADAPTERS for b in ATTENTION], ids=lambda p: f"{p[0]}-{p[1]}")
def model_and_batch(request):
    return build(*request.param)


@pytest.mark.parametrize("method", sorted(KEEP_ALL))
def test_keep_everything_is_bit_identical(model_and_batch, method):
    model, batch = model_and_batch
    with torch.no_grad():
        stock_logits = model(**batch).logits
        stock_tokens = model.generate(**batch, max_new_tokens=4, do_sample=False)
        with mmreduce.wrap(model, method, **KEEP_ALL[method]) as reduced:
            logits = reduced(**batch).logits
            tokens = reduced.generate(**batch, max_new_tokens=4, do_sample=False)
            assert not reduced.stats.reduced
    assert torch.equal(logits, stock_logits)
    assert torch.equal(tokens, stock_tokens)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_matches_masked_reference(model_and_batch, method):
    """Physical dropping == full-length masked eager reference, at prefill and every decode step, cache or not."""
    model, batch = model_and_batch
    kwargs, stages = METHODS[method]
    steps = 4
    with torch.no_grad(), mmreduce.wrap(model, method, **kwargs) as reduced:
        logits = reduced(**batch).logits
        kept = reduced.stats.kept_positions
        cached = reduced.generate(**batch, max_new_tokens=steps, do_sample=False, output_logits=True,
                                  return_dict_in_generate=True)
        uncached = reduced.generate(**batch, max_new_tokens=steps, do_sample=False, output_logits=True,
                                    return_dict_in_generate=True, use_cache=False)
    if stages is not None:
        dropped_from, reference_kept = reference_selection(model, batch, stages, IMAGE_TOKEN)
        assert kept == reference_kept, "selection differs from the eager-attention reference"
    else:
        dropped_from = dropped_from_kept(batch, kept, IMAGE_TOKEN)
    assert kept, "the method dropped nothing: the comparison would be vacuous"

    reference_logits, _ = masked_forward(model, batch, dropped_from)
    final_dropped = dropped_from[max(dropped_from)]
    compared = batch["attention_mask"].bool() & ~final_dropped  # positions that reach the last layer
    assert torch.allclose(logits[compared], reference_logits[compared], atol=1e-5, rtol=0)

    reference_tokens, reference_steps = masked_greedy(model, batch, dropped_from, steps)
    for run in (cached, uncached):
        assert torch.equal(run.sequences[:, -steps:], reference_tokens)
        for step_logits, reference_step in zip(run.logits, reference_steps):
            assert torch.allclose(step_logits, reference_step, atol=1e-5, rtol=0)
    # ...and the reduction really changed the output (otherwise every check above could pass on a no-op).
    with torch.no_grad():
        stock_last = model(**batch).logits[:, -1]
    assert (stock_last - logits[:, -1]).abs().max() > 1e-3


@pytest.mark.parametrize("method", sorted(METHODS))
def test_padded_batch_equals_each_sample_alone(model_and_batch, method):
    model, batch = model_and_batch
    kwargs, _ = METHODS[method]
    with torch.no_grad(), mmreduce.wrap(model, method, **kwargs) as reduced:
        batched = reduced.generate(**batch, max_new_tokens=4, do_sample=False)
        batched_kept = reduced.stats.kept_positions
        pad = (~batch["attention_mask"].bool()).sum(dim=1)
        for row in range(batch["input_ids"].shape[0]):
            alone = reduced.generate(**select_samples(batch, row), max_new_tokens=4, do_sample=False)
            assert torch.equal(alone[0, -4:], batched[row, -4:]), f"sample {row} differs alone vs in the batch"
            for layer, rows in reduced.stats.kept_positions.items():
                shifted = [p + int(pad[row]) for p in rows[0]]
                assert shifted == batched_kept[layer][row]


@pytest.mark.parametrize("method", ["fastv", "pdrop"])
def test_beam_search_cache_and_padding(model_and_batch, method):
    model, batch = model_and_batch
    kwargs, _ = METHODS[method]
    beam = dict(max_new_tokens=4, do_sample=False, num_beams=3, num_return_sequences=2)
    with torch.no_grad(), mmreduce.wrap(model, method, **kwargs) as reduced:
        cached = reduced.generate(**batch, **beam)
        uncached = reduced.generate(**batch, **beam, use_cache=False)
        first_alone = reduced.generate(**select_samples(batch, 0), **beam)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached[:2, -4:], first_alone[:, -4:])


def test_cache_lengths_shrink_per_layer():
    model, batch = build("llava", "sdpa")
    with torch.no_grad(), mmreduce.wrap(model, "fastv", layer=2, keep_ratio=0.25) as reduced:
        out = reduced.generate(**batch, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
        stats = reduced.stats
    cache = out.cache if hasattr(out, "cache") else out.past_key_values
    lengths = [cache.get_seq_length(layer) for layer in range(LAYERS)]
    prompt = batch["input_ids"].shape[1]
    longest_text = max(stats.text_tokens)
    # layers 0-1 keep the padded prompt; later layers hold the longest row's kept tokens (padding removed).
    assert lengths[:2] == [prompt + 2] * 2
    assert lengths[2:] == [longest_text + 16 + 2] * (LAYERS - 2)
    assert stats.vision_tokens_per_layer == [[64, 64, 16, 16, 16, 16]] * 3
    assert stats.decode_steps == 2 and stats.prefill_ms > 0


def test_unwrap_restores_exactly_and_models_do_not_share_state():
    first, batch = build("llava", "sdpa")
    second, _ = build("llava", "sdpa")
    def hook_ids(model):
        return {(name, kind, key) for name, module in model.named_modules()
                for kind, table in (("pre", module._forward_pre_hooks), ("post", module._forward_hooks))
                for key in table}

    with torch.no_grad():
        before = first(**batch).logits
    stock_hooks = hook_ids(first)  # after a forward: transformers installs its own capture hooks lazily
    with torch.no_grad():
        reduced_first = mmreduce.wrap(first, "fastv", keep_ratio=0.25)
        reduced_second = mmreduce.wrap(second, "pdrop", keep_ratio=0.5)
        assert len(hook_ids(first) - stock_hooks) == LAYERS + 5  # one per layer + text start/end, multimodal, vision
        reduced_first(**batch)
        reduced_second(**batch)
        assert reduced_first.stats.vision_tokens_per_layer[0] == [64, 64, 16, 16, 16, 16]
        assert reduced_second.stats.vision_tokens_per_layer[0] == [64, 64, 32, 16, 8, 8]
        with pytest.raises(ValueError, match="already wrapped"):
            mmreduce.wrap(first, "pdrop")
        with pytest.raises(ValueError, match="already wrapped"):
            mmreduce.wrap(reduced_first, "pdrop")
        mmreduce.unwrap(first)
        after = first(**batch).logits
        assert hook_ids(first) == stock_hooks
        # wrapping again after unwrap works and reduces again
        with mmreduce.wrap(first, "fastv", keep_ratio=0.25) as again:
            again(**batch)
            assert again.stats.reduced
        reduced_second.unwrap()
    assert torch.equal(before, after)
    with pytest.raises(RuntimeError, match="unwrapped"):
        reduced_first(**batch)


def test_prompt_without_image_runs_unreduced():
    model, _ = build("llava", "sdpa")
    ids = torch.tensor([[1, 5, 6, 7, 8]])
    with torch.no_grad():
        stock = model.generate(input_ids=ids, max_new_tokens=3, do_sample=False)
        with mmreduce.wrap(model, "fastv") as reduced:
            out = reduced.generate(input_ids=ids, max_new_tokens=3, do_sample=False)
            stats = reduced.stats
    assert torch.equal(out, stock)
    assert not stats.reduced and "no image tokens" in stats.note
    assert stats.vision_tokens_per_layer == [[0] * LAYERS]


def test_selection_is_deterministic_and_sorted():
    model, batch = build("llava_next", "sdpa")
    runs = []
    for _ in range(2):
        with torch.no_grad(), mmreduce.wrap(model, "pdrop", keep_ratio=0.5) as reduced:
            reduced(**batch)
            runs.append(reduced.stats.kept_positions)
    assert runs[0] == runs[1]
    for rows in runs[0].values():
        for kept in rows:
            assert kept == sorted(kept) and len(set(kept)) == len(kept)
    counts = [len(runs[0][2][row]) for row in range(3)]
    assert counts == [35, 28, 44]  # ⌈0.5·n⌉ of 70, 56, 88 vision tokens (anyres crops + newlines)


def test_cache_free_generate_keeps_the_prefill_stats_and_counts_decode_steps():
    model, batch = build("llava", "sdpa")
    with torch.no_grad(), mmreduce.wrap(model, "fastv", layer=2, keep_ratio=0.25) as reduced:
        reduced.generate(**batch, max_new_tokens=4, do_sample=False, use_cache=False)
        stats = reduced.stats
    assert stats.reduced and stats.vision_tokens_per_layer == [[64, 64, 16, 16, 16, 16]] * 3
    assert stats.decode_steps == 3 and stats.prefill_ms > 0
