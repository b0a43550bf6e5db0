"""The engine behind `mmreduce.wrap`: cache lengths, unwrap, prompts without images, deterministic selection,
stats, refused inputs (static cache, 4-D masks, unsupported attention, unknown model types) and custom adapters.

The invariants that hold for every method and adapter are in test_invariants.py; these pin the engine's own
behaviour on one tiny LLaVA-1.5 (LLaVA-NeXT where its anyres counts matter).
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import DynamicCache, StaticCache

import mmreduce
from mmreduce.adapters import ModelAdapter, get_adapter
from tests.support.vlm_factory import build_vlm, llava_batch, tiny_llava

LAYERS = 6


def test_cache_lengths_shrink_per_layer(fresh_llava, llava_inputs):
    model, batch = fresh_llava, llava_inputs
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


def test_unwrap_restores_exactly_and_models_do_not_share_state(fresh_llava, llava_inputs):
    first, batch = fresh_llava, llava_inputs
    second = tiny_llava("sdpa", layers=LAYERS)

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


def test_prompt_without_image_runs_unreduced(fresh_llava):
    model = fresh_llava
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
    model, batch = build_vlm("llava_next", "sdpa", layers=LAYERS)
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


def test_cache_free_generate_keeps_the_prefill_stats_and_counts_decode_steps(fresh_llava, llava_inputs):
    model, batch = fresh_llava, llava_inputs
    with torch.no_grad(), mmreduce.wrap(model, "fastv", layer=2, keep_ratio=0.25) as reduced:
        reduced.generate(**batch, max_new_tokens=4, do_sample=False, use_cache=False)
        stats = reduced.stats
    assert stats.reduced and stats.vision_tokens_per_layer == [[64, 64, 16, 16, 16, 16]] * 3
    assert stats.decode_steps == 3 and stats.prefill_ms > 0


def test_static_cache_and_4d_masks_are_refused(module_llava):
    model = module_llava
    batch = llava_batch(prompt_lengths=((3, 5),))
    with torch.no_grad(), mmreduce.wrap(model, "fastv") as reduced:
        with pytest.raises(ValueError, match="DynamicCache"):
            reduced.generate(**batch, max_new_tokens=2, cache_implementation="static")
        static = StaticCache(config=model.config.text_config, max_cache_len=128)
        with pytest.raises(ValueError, match="DynamicCache"):
            reduced(**batch, cache=static)
        four_d = torch.ones(1, 1, batch["input_ids"].shape[1], batch["input_ids"].shape[1])
        with pytest.raises(ValueError, match="2-D attention mask"):
            reduced(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"], attention_mask=four_d)
        reduced(**batch, cache=DynamicCache(config=model.config.text_config))  # the supported cache works


def test_unsupported_attention_and_unknown_model_type(module_llava):
    model = module_llava
    previous = model.config.text_config._attn_implementation
    model.config.text_config._attn_implementation = "flex_attention"
    try:
        with pytest.raises(ValueError, match="'flex_attention' is not supported"):
            mmreduce.wrap(model, "fastv")
    finally:
        model.config.text_config._attn_implementation = previous
    text_only = model.model.language_model
    with pytest.raises(ValueError, match="no mmreduce adapter for model_type 'llama'.*supported: .*llava, llava_next"):
        mmreduce.wrap(text_only, "fastv")
    with pytest.raises(TypeError, match="torch.nn.Module"):
        mmreduce.wrap("llava", "fastv")
    with pytest.raises(ValueError, match="not wrapped"):
        mmreduce.unwrap(model)


def test_custom_adapter_can_be_passed(module_llava, llava_inputs):
    model = module_llava
    class Custom(ModelAdapter):
        model_types = ("custom-test",)
        multimodal_model = property(lambda self: self.model.model)
        text_model = property(lambda self: self.model.model.language_model)

        def vision_token_ids(self):
            return (250,)

    adapter = get_adapter(model, Custom)
    assert isinstance(adapter, Custom)
    with torch.no_grad(), mmreduce.wrap(model, "fastv", adapter=Custom, keep_ratio=0.25) as reduced:
        reduced(**llava_inputs)
        assert reduced.stats.vision_tokens_per_layer[0][2] == 16


def test_stats_report_tokens_flops_and_times(module_llava, llava_inputs):
    model, batch = module_llava, llava_inputs
    with torch.no_grad(), mmreduce.wrap(model, "fastv", layer=2, keep_ratio=0.25) as reduced:
        reduced.generate(**batch, max_new_tokens=3, do_sample=False)
        stats = reduced.stats
    assert stats.equivalent_vision_tokens == pytest.approx((2 * 64 + 4 * 16) / 6)
    assert stats.text_tokens == [9, 4, 16]
    assert 0 < stats.prefill_flops < stats.baseline_prefill_flops
    assert stats.prefill_ms > 0 and stats.decode_steps == 2 and stats.decode_ms_per_token > 0
    assert stats.generate_ms >= stats.prefill_ms
    assert stats.vision_ms > 0
    record = stats.to_dict()
    assert record["kept_positions"]["2"] == stats.kept_positions[2]
    assert json.dumps(record)  # serialisable


def test_stats_name_the_vision_positions(module_llava, llava_inputs):
    with torch.no_grad(), mmreduce.wrap(module_llava, "fastv", layer=2, keep_ratio=0.25) as reduced:
        reduced(**llava_inputs)
        stats = reduced.stats
    vision = (llava_inputs["input_ids"] == 250) & llava_inputs["attention_mask"].bool()
    assert stats.vision_positions == [row.nonzero().flatten().tolist() for row in vision]



def test_the_inner_model_can_be_wrapped_and_reduces_as_the_whole_one(module_llava, llava_inputs):
    """`model.model` (LlavaModel, no LM head) takes the same adapter: same kept tokens, same last hidden states."""
    with torch.no_grad():
        with mmreduce.wrap(module_llava, "fastv", layer=2, keep_ratio=0.25) as whole:
            whole_logits = whole(**llava_inputs).logits
            whole_kept = whole.stats.kept_positions
        with mmreduce.wrap(module_llava.model, "fastv", layer=2, keep_ratio=0.25) as inner:
            hidden = inner(**llava_inputs).last_hidden_state  # (B, T, D), scattered back to prompt length
            inner_kept = inner.stats.kept_positions
        inner_logits = module_llava.lm_head(hidden)
    assert inner_kept == whole_kept and whole_kept
    torch.testing.assert_close(inner_logits, whole_logits, rtol=0, atol=0)


def test_a_stage_ranked_where_the_previous_one_applies_sees_the_shortened_stream(module_llava, llava_inputs):
    """Stages (rank 1, apply 2) then (rank 2, apply 3): the second ranks layer 2's input, which the first already
    shortened. The selection and logits equal the eager masked reference, which ranks on the masked stream."""
    from dataclasses import dataclass

    from mmreduce.methods import DropStage, ReductionMethod
    from tests.support.masked_reference import masked_forward, reference_selection, text_view

    @dataclass
    class BackToBack(ReductionMethod):
        name = "back_to_back"

        def stages(self, num_layers):
            return [DropStage(1, 2, ratio=0.5), DropStage(2, 3, ratio=0.5)]

    image_id = module_llava.config.image_token_id
    with mmreduce.wrap(module_llava, BackToBack()) as reduced, torch.no_grad():
        logits = reduced(**llava_inputs).logits
        kept = reduced.stats.kept_positions
    assert [counts[:4] for counts in reduced.stats.vision_tokens_per_layer] == [[64, 64, 32, 16]] * 3
    stages = [dict(score_layer=1, apply_layer=2, ratio=0.5), dict(score_layer=2, apply_layer=3, ratio=0.5)]
    with torch.no_grad():
        dropped_from, reference_kept = reference_selection(module_llava, llava_inputs, stages, image_id)
        reference_logits, _ = masked_forward(module_llava, llava_inputs, dropped_from)
    assert kept == reference_kept
    input_mask, _ = text_view(module_llava, llava_inputs, image_id)
    compared = input_mask & ~dropped_from[3]
    assert torch.allclose(logits[compared], reference_logits[compared], atol=1e-5, rtol=0)
