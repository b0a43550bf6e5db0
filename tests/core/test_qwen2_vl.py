"""Qwen2-VL and Qwen2.5-VL (`adapters/qwen2_vl.py`): what the invariant matrix does not show on its image batches.

The vision tokens are exactly the image and video pads (never the <|vision_start|>/<|vision_end|> markers); video
prompts, and a prompt with an image and a video, are reduced and equal the eager full-length masked reference at
prefill and at every greedy decode step; decoding after a reduced prefill under sampling with a fixed seed computes
the reference's logits; the adapter refuses models it does not fit; and a model of Qwen2-VL-2B's widths runs.
"""

from __future__ import annotations

import dataclasses
import time

import pytest
import torch

import mmreduce
from mmreduce.adapters import Qwen2VLAdapter, get_adapter
from tests.support.masked_reference import assert_matches_reference, masked_forward, reference_selection
from tests.support.vlm_factory import (
    IMAGE_TOKEN,
    QWEN_VIDEO_TOKEN,
    QWEN_VISION_END,
    QWEN_VISION_START,
    qwen2_vl_batch,
    qwen2_vl_video_batch,
    tiny_llava,
    tiny_qwen2_5_vl,
    tiny_qwen2_vl,
)

LAYERS = 6
FAMILIES = {"qwen2_vl": tiny_qwen2_vl, "qwen2_5_vl": tiny_qwen2_5_vl}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def qwen(request):
    """A tiny Qwen2-VL / Qwen2.5-VL (sdpa, 6 layers), one per family and module."""
    return FAMILIES[request.param]("sdpa", layers=LAYERS)


def mixed_batch(model) -> dict:
    """One prompt holding an image (5x7 merged tokens) and, later, a video (t=2, 4x5 merged tokens)."""
    image = qwen2_vl_batch(model, image_sizes=((40, 56),), prompt_lengths=((2, 1),), seed=1)
    video = qwen2_vl_video_batch(model, video_sizes=((4, 32, 40),), prompt_lengths=((1, 3),), seed=2)
    batch = {key: torch.cat([image[key], video[key]], dim=1)
             for key in ("input_ids", "attention_mask", "mm_token_type_ids")}
    batch.update({key: value for key, value in {**image, **video}.items() if key not in batch})
    return batch


BATCHES = {"images": qwen2_vl_batch, "videos": qwen2_vl_video_batch, "image+video": mixed_batch}


def between_markers(input_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: positions strictly between a <|vision_start|> and the next <|vision_end|> (the layout, read
    without the pad ids)."""
    opened = (input_ids == QWEN_VISION_START).long().cumsum(dim=1)
    closed = (input_ids == QWEN_VISION_END).long().cumsum(dim=1)
    return (opened > closed) & (input_ids != QWEN_VISION_START)


def merged_tokens(model, batch: dict) -> int:
    """Vision features the tower hands the LLM for all images and videos of `batch`: t*h*w / merge^2 each."""
    merge = model.config.vision_config.spatial_merge_size
    grids = [batch[key] for key in ("image_grid_thw", "video_grid_thw") if key in batch]
    return int(sum(int((grid.prod(dim=-1) // merge**2).sum()) for grid in grids))


@pytest.mark.parametrize("kind", sorted(BATCHES))
def test_vision_mask_is_exactly_the_pads(qwen, kind):
    batch = BATCHES[kind](qwen)
    adapter = get_adapter(qwen)
    assert isinstance(adapter, Qwen2VLAdapter)
    assert adapter.vision_token_ids() == (IMAGE_TOKEN, QWEN_VIDEO_TOKEN)
    assert adapter.vision_tower is qwen.model.visual and adapter.text_model is qwen.model.language_model
    ids = batch["input_ids"]
    mask = adapter.vision_mask(input_ids=ids)
    assert torch.equal(mask, between_markers(ids))
    assert torch.equal(mask, batch["mm_token_type_ids"] > 0)
    assert not mask[(ids == QWEN_VISION_START) | (ids == QWEN_VISION_END)].any()
    assert int(mask.sum()) == merged_tokens(qwen, batch)
    with torch.no_grad():
        embeds = qwen.get_input_embeddings()(ids)
    assert torch.equal(adapter.vision_mask(inputs_embeds=embeds), mask)
    with torch.no_grad(), mmreduce.wrap(qwen, "baseline") as reduced:
        reduced(**batch)
        assert reduced.stats.initial_vision_tokens == mask.sum(dim=1).tolist()


@pytest.mark.parametrize("method", ["fastv", "pdrop"])
@pytest.mark.parametrize("kind", ["videos", "image+video"])
def test_video_prompts_match_masked_reference(qwen, kind, method):
    """Video pads (alone, and after an image in the same prompt) are ranked and dropped like image pads: same
    selection as the eager reference, logits within 1e-5 at prefill and at every greedy step, cache or not."""
    batch = BATCHES[kind](qwen)
    reduction = mmreduce.method_class(method).example(LAYERS)
    stages = [{key: value for key, value in dataclasses.asdict(stage).items() if value is not None}
              for stage in reduction.check_stages(LAYERS)]
    steps = 3
    with torch.no_grad(), mmreduce.wrap(qwen, reduction) as reduced:
        logits = reduced(**batch).logits
        kept = reduced.stats.kept_positions
        runs = [reduced.generate(**batch, max_new_tokens=steps, do_sample=False, output_logits=True,
                                 return_dict_in_generate=True, use_cache=use_cache) for use_cache in (True, False)]
    dropped_from, reference_kept = reference_selection(qwen, batch, stages, (IMAGE_TOKEN, QWEN_VIDEO_TOKEN))
    assert kept and kept == reference_kept
    if kind == "image+video":  # both kinds of pads lost tokens
        final = dropped_from[max(dropped_from)]
        assert final[batch["input_ids"] == IMAGE_TOKEN].any() and final[batch["input_ids"] == QWEN_VIDEO_TOKEN].any()
    assert_matches_reference(qwen, batch, logits, runs, dropped_from, batch["attention_mask"].bool(), steps)


def test_sampling_after_a_reduced_prefill_matches_masked_reference(qwen):
    """Sampling with a fixed seed: the same draws twice and cache-free; every step's logits are the reference's,
    teacher-forced on the sampled tokens (M-RoPE decode positions and rope_deltas come from generate())."""
    batch = qwen2_vl_batch(qwen)
    reduction = mmreduce.method_class("fastv").example(LAYERS)
    steps = 4
    sample = dict(max_new_tokens=steps, do_sample=True, top_k=0, top_p=1.0, temperature=1.0, output_logits=True,
                  return_dict_in_generate=True)
    runs = []
    with torch.no_grad(), mmreduce.wrap(qwen, reduction) as reduced:
        for use_cache in (True, True, False):
            torch.manual_seed(1234)
            runs.append(reduced.generate(**batch, **sample, use_cache=use_cache))
        kept = reduced.stats.kept_positions
    assert torch.equal(runs[0].sequences, runs[1].sequences) and torch.equal(runs[0].sequences, runs[2].sequences)
    stages = [{key: value for key, value in dataclasses.asdict(stage).items() if value is not None}
              for stage in reduction.check_stages(LAYERS)]
    dropped_from, reference_kept = reference_selection(qwen, batch, stages, get_adapter(qwen).vision_token_ids())
    assert kept == reference_kept
    sequences = runs[0].sequences
    prompt = batch["input_ids"].shape[1]
    grown = sequences.shape[1] - 1 - prompt  # every sampled token but the last is input to a step
    inputs = dict(batch, input_ids=sequences[:, :-1])
    inputs["attention_mask"] = torch.cat([batch["attention_mask"], torch.ones(3, grown, dtype=torch.long)], dim=1)
    inputs["mm_token_type_ids"] = torch.cat([batch["mm_token_type_ids"], torch.zeros(3, grown, dtype=torch.long)], 1)
    grown_drops = {layer: torch.cat([dropped, torch.zeros(3, grown, dtype=torch.bool)], dim=1)
                   for layer, dropped in dropped_from.items()}
    reference_logits, _ = masked_forward(qwen, inputs, grown_drops)
    for run in runs:
        for step, step_logits in enumerate(run.logits):
            assert torch.allclose(step_logits, reference_logits[:, prompt - 1 + step], atol=1e-5, rtol=0)


def test_prompt_without_vision_runs_unreduced(qwen):
    text = torch.tensor([[1, 5, 6, 7, 8, 9]])
    with torch.no_grad():
        stock = qwen.generate(input_ids=text, attention_mask=torch.ones_like(text), max_new_tokens=3, do_sample=False)
        with mmreduce.wrap(qwen, "fastv", layer=2, keep_ratio=0.25) as reduced:
            tokens = reduced.generate(input_ids=text, attention_mask=torch.ones_like(text), max_new_tokens=3,
                                      do_sample=False)
            assert "no image tokens" in reduced.stats.note and not reduced.stats.reduced
    assert torch.equal(tokens, stock)


def test_adapter_refuses_models_it_does_not_fit(qwen):
    llava = tiny_llava("sdpa", layers=2)
    with pytest.raises(TypeError, match="qwen2_vl.*'llava'"):
        mmreduce.wrap(llava, "fastv", adapter="qwen2_vl")
    with pytest.raises(TypeError, match="'llava'"):
        Qwen2VLAdapter(llava)
    stub = torch.nn.Module()  # the right model_type, not the structure
    stub.config, stub.model = qwen.config, torch.nn.Module()
    with pytest.raises(TypeError, match=r"\.model\.visual"):
        Qwen2VLAdapter(stub)
    mmreduce.wrap(llava, "fastv", layer=1).unwrap()  # a refused wrap leaves nothing installed
    # Named explicitly, the family's adapter is taken as it is; the inner model (no LM head) is accepted too.
    with mmreduce.wrap(qwen, "fastv", adapter="qwen2_5_vl") as reduced:
        assert isinstance(reduced.adapter, Qwen2VLAdapter)
    inner = Qwen2VLAdapter(qwen.model)
    assert inner.text_model is qwen.model.language_model and inner.vision_tower is qwen.model.visual


def test_llava_adapter_on_a_qwen_model_is_refused(qwen):
    with pytest.raises(TypeError, match="LlavaAdapter"):
        mmreduce.wrap(qwen, "fastv", adapter="llava")


def qwen2_vl_2b_shapes(text_layers: int = 2, vision_blocks: int = 1):
    """Qwen2-VL-2B-Instruct's widths with random weights, few layers and the tiny vocabulary (the LM head and the
    embeddings are not what is measured): text hidden 1536, 12 heads, 2 kv heads, MLP 8960, M-RoPE 16/24/24;
    vision embed 1280, 16 heads, patch 14, 2x2 merge into 1536."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    torch.manual_seed(0)
    config = Qwen2VLConfig(
        vision_config=dict(depth=vision_blocks, embed_dim=1280, hidden_size=1536, num_heads=16, mlp_ratio=4,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2),
        text_config=dict(vocab_size=256, hidden_size=1536, intermediate_size=8960, num_hidden_layers=text_layers,
                         num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
                         pad_token_id=0, bos_token_id=1, eos_token_id=2),
        image_token_id=IMAGE_TOKEN, video_token_id=QWEN_VIDEO_TOKEN, vision_start_token_id=QWEN_VISION_START,
        vision_end_token_id=QWEN_VISION_END,
    )
    model = Qwen2VLForConditionalGeneration(config).eval()
    model.set_attn_implementation("sdpa")
    model.generation_config.suppress_tokens = [IMAGE_TOKEN, QWEN_VIDEO_TOKEN]
    return model


@pytest.mark.slow
def test_real_shapes_reduce_one_448px_image():
    """One 448x448 image through Qwen2-VL's own image processor: 32x32 patches of 14 px, 256 vision tokens;
    pdrop and fastv (drop at layer 1 of 2, keep half) generate a few tokens."""
    from PIL import Image
    from transformers import Qwen2VLImageProcessorPil

    model = qwen2_vl_2b_shapes()
    generator = torch.Generator().manual_seed(0)
    image = Image.fromarray((torch.rand(448, 448, 3, generator=generator) * 255).to(torch.uint8).numpy())
    pixels = Qwen2VLImageProcessorPil()(images=[image], return_tensors="pt")  # the checkpoint's processor defaults
    assert pixels["image_grid_thw"].tolist() == [[1, 32, 32]] and tuple(pixels["pixel_values"].shape) == (1024, 1176)
    text = torch.randint(3, 200, (24,), generator=generator).tolist()
    ids = torch.tensor([text[:8] + [QWEN_VISION_START] + [IMAGE_TOKEN] * 256 + [QWEN_VISION_END] + text[8:]])
    batch = dict(input_ids=ids, attention_mask=torch.ones_like(ids), mm_token_type_ids=(ids == IMAGE_TOKEN).long(),
                 **pixels)
    methods = {"pdrop": dict(layers=[1], keep_ratio=0.5), "fastv": dict(layer=1, keep_ratio=0.5)}
    for name, fields in methods.items():
        with torch.no_grad(), mmreduce.wrap(model, name, **fields) as reduced:
            start = time.perf_counter()
            tokens = reduced.generate(**batch, max_new_tokens=4, do_sample=False)
            seconds = time.perf_counter() - start
            stats = reduced.stats
        reduced_flops, baseline_flops = stats.flops()
        print(f"\n{name}: vision tokens per layer {stats.vision_tokens_per_layer}, prefill FLOPs "
              f"{reduced_flops / 1e9:.1f} / {baseline_flops / 1e9:.1f} G = {reduced_flops / baseline_flops:.3f}, "
              f"vision {stats.vision_ms:.0f} ms, prefill {stats.prefill_ms:.0f} ms, decode {stats.decode_ms:.0f} ms "
              f"({stats.decode_steps} steps), generate {seconds:.2f} s")
        assert tokens.shape == (1, ids.shape[1] + 4)
        assert stats.reduced and stats.vision_tokens_per_layer == [[256, 128]]
        assert stats.text_tokens == [26] and 0.7 < reduced_flops / baseline_flops < 0.85
