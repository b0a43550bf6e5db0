"""FLOPs against the papers' published figures and a counted forward; the probe against eager attention."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import mmreduce
from mmreduce.adapters import get_adapter
from mmreduce.flops import ModelDims, decode_flops_per_token, layer_flops, paper_tflops, prefill_flops
from tests.support.vlm_factory import llava_batch, tiny_llava

LLAVA_7B = ModelDims(hidden=4096, intermediate=11008, num_heads=32, num_kv_heads=32, head_dim=128, num_layers=32)


def test_pyramiddrop_vanilla_llava_7b_is_3_82_tflops():
    assert round(paper_tflops(576, LLAVA_7B, "pdrop"), 2) == 3.82


@pytest.mark.parametrize("tokens, published", [(192, 1.253), (128, 0.833), (64, 0.416)])
def test_vscan_figures_at_192_128_64_tokens(tokens, published):
    assert round(paper_tflops(tokens, LLAVA_7B, "pdrop"), 3) == published


def test_fastv_formula_per_layer():
    n, d, m = 600, 4096, 11008
    assert layer_flops(n, LLAVA_7B, "fastv") == 4 * n * d**2 + 2 * n**2 * d + 2 * n * d * m
    assert layer_flops(n, LLAVA_7B, "pdrop") - layer_flops(n, LLAVA_7B, "fastv") == n * d * m
    with pytest.raises(ValueError, match="unknown FLOPs convention"):
        layer_flops(n, LLAVA_7B, "calflops")
    with pytest.raises(ValueError, match="3 entries for 32 layers"):
        prefill_flops([1, 2, 3], LLAVA_7B)


def test_exact_count_equals_a_counted_forward_of_a_gqa_model():
    """torch's FlopCounterMode counts every matmul of the decoder stack; ours must give the same number."""
    model = tiny_llava("eager", layers=6)
    text_model = model.model.language_model
    dims = ModelDims.from_config(text_model.config)
    assert dims.num_kv_heads < dims.num_heads  # GQA: k/v projections narrower than q
    embeds = torch.randn(1, 50, dims.hidden)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        text_model(inputs_embeds=embeds, use_cache=False)
    assert counter.get_total_flops() == prefill_flops([50] * 6, dims, "exact")


def test_reduced_forward_counts_match_stats_plus_the_probe():
    """Counted FLOPs of the whole model, reduced minus stock = what the stats predict + the scoring probe.
    (Eager: torch counts a causal sdpa call as half a square, while our convention, like the papers', is full.)"""
    model = tiny_llava("eager", layers=6)
    batch = {k: v[:1] for k, v in llava_batch(prompt_lengths=((4, 6),)).items()}
    dims = ModelDims.from_config(model.model.language_model.config)
    with torch.no_grad():
        with FlopCounterMode(display=False) as stock:
            model(**batch)
        with mmreduce.wrap(model, "fastv", layer=2, keep_ratio=0.25) as reduced:
            with FlopCounterMode(display=False) as counted:
                reduced(**batch)
            stats = reduced.stats
    assert stats.vision_tokens_per_layer == [[64, 64, 16, 16, 16, 16]]
    tokens = batch["input_ids"].shape[1]
    # The probe at layer 1: q for one token, k for every token, one row of scores.
    q_width, kv_width = dims.num_heads * dims.head_dim, dims.num_kv_heads * dims.head_dim
    probe = 2 * dims.hidden * q_width + 2 * tokens * dims.hidden * kv_width + 2 * q_width * tokens
    saved = stats.baseline_prefill_flops - stats.prefill_flops
    assert stock.get_total_flops() - counted.get_total_flops() == saved - probe
    assert stats.baseline_prefill_flops == prefill_flops([tokens] * 6, dims)


def test_decode_flops_only_the_attention_term_shrinks():
    full = decode_flops_per_token([700] * 32, LLAVA_7B)
    reduced = decode_flops_per_token([700] * 2 + [200] * 30, LLAVA_7B)
    assert full - reduced == 30 * 500 * 2 * 2 * 4096


def test_probe_matches_eager_attention_weights_with_gqa_and_padding():
    model = tiny_llava("eager", layers=4)
    batch = llava_batch()
    adapter = get_adapter(model)
    layer_idx = 2
    captured = {}
    layer = model.model.language_model.layers[layer_idx]
    handles = [
        layer.register_forward_pre_hook(lambda m, a, k: captured.update(inputs=(a, k)), with_kwargs=True),
        layer.self_attn.register_forward_hook(lambda m, a, out: captured.update(weights=out[1])),
    ]
    with torch.no_grad():
        model(**batch)
        for handle in handles:
            handle.remove()
        args, kwargs = captured["inputs"]
        hidden = args[0] if args else kwargs["hidden_states"]
        query = torch.full((hidden.shape[0],), hidden.shape[1] - 1)
        probe = adapter.attention_probe(layer, hidden, query, kwargs["position_embeddings"],
                                        batch["attention_mask"].bool())
    eager = captured["weights"][:, :, -1, :]  # (B, H, T) last-token row
    assert probe.shape == eager.shape
    assert torch.allclose(probe, eager.float(), atol=1e-5, rtol=0)
