"""mPLUG-DocOwl 1.5 stand-in (`mmreduce.eval.docowl`) and its adapter.

The invariant matrix (tests/core/test_invariants.py) runs every method on the tiny stand-in of
tests/support/vlm_factory.py (three pages of 3, 2 and 5 crops). This file checks the stand-in's own structure
(anchor choice, panel order, prompt layout, 257 tokens per 448 px crop, what the text model receives), the
adapter's contract (vision tokens from `modality_indicators`, a probe that routes each token through its branch),
and a run at DocOwl 1.5's real widths.
"""

from __future__ import annotations

import time

import pytest
import torch
from PIL import Image

import mmreduce
from mmreduce.adapters import ADAPTERS, get_adapter, load_pretrained, model_class_for
from mmreduce.adapters.docowl import DocOwlAdapter
from mmreduce.eval.docowl import (
    DocOwlConfig,
    DocOwlForConditionalGeneration,
    DocProcessor,
    MplugDocOwlHReducerModel,
    MplugOwlVisionModel,
    select_anchor,
)
from mmreduce.flops import ModelDims, layer_flops
from tests.support.vlm_factory import IMAGE_TOKEN, tiny_docowl_with_batch, tiny_llava

CROPS = (3, 2, 5)  # the builder's pages: 56x112 -> 1x2 + global, 56x56 -> 1x1 + global, 112x112 -> 2x2 + global
PER_CROP = 17  # 56 px, patch 7 -> 8x8 patches -> H-Reducer 1x4 -> 8x2 + eos


@pytest.fixture(scope="module")
def docowl():
    return tiny_docowl_with_batch("eager", layers=4)


def _page(height: int, width: int, seed: int = 0) -> Image.Image:
    pixels = torch.rand(height, width, 3, generator=torch.Generator().manual_seed(seed)) * 255
    return Image.fromarray(pixels.to(torch.uint8).numpy())


def _text_inputs(model, **inputs) -> list[dict]:
    """The keyword arguments the text model receives, call by call (prefill, then decode steps)."""
    calls = []
    handle = model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append(dict(kwargs)), with_kwargs=True)
    try:
        with torch.no_grad():
            if "max_new_tokens" in inputs:
                model.generate(**inputs)
            else:
                model(**inputs)
    finally:
        handle.remove()
    return calls


# ---- the processor ---------------------------------------------------------------------------------------------

# (height, width) -> (rows, cols), worked out by hand at 448 px. Score = 100 * shape-IoU + IoU, shape-IoU comparing
# the anchor (cols*448 x rows*448) with a box of the anchor's width and the page's aspect ratio.
HAND_ANCHORS = [
    ((448, 448), (1, 1)),  # square: (1,1), (2,2), (3,3) fit the shape; only (1,1) has IoU 1
    ((896, 896), (2, 2)),  # same shapes; IoU 0.25 / 1 / 0.44
    ((448, 896), (1, 2)),  # 1:2 exactly; (2,4) fits the shape too but its IoU is 0.25
    ((1000, 700), (3, 2)),  # h/w = 1.43: shape-IoU 0.95 for 3x2 (1.5), 0.70 for 1x1, 0.71 for 2x1
    ((2000, 500), (4, 1)),  # h/w = 4 exactly
    ((600, 4000), (1, 7)),  # w/h = 6.67: shape-IoU 0.95 for 1x7 (6/6.67 = 0.90 for 1x6, 6.67/8 = 0.83 for 1x8)
]


@pytest.mark.parametrize("size, grid", HAND_ANCHORS)
def test_anchor_is_chosen_by_shape_then_resolution(size, grid):
    assert select_anchor(*size) == grid


def test_grid_9_is_every_grid_of_at_most_nine_crops():
    processor = DocProcessor()
    assert sorted(processor.anchors) == sorted((r, c) for r in range(1, 10) for c in range(1, 10) if r * c <= 9)
    assert len(processor.anchors) == 23 and processor.anchor_max == 9


def test_global_image_first_then_crops_row_major_and_the_prompt():
    processor = DocProcessor(image_size=56)
    page = _page(112, 168)  # h/w = 2/3 -> 2x3
    pixels, positions, text = processor(page, "Q: <|image|> what?")
    assert pixels.shape == (7, 3, 56, 56)
    assert positions.tolist() == [[9, 9], [0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2]]
    crops = "".join(f"<crop_img_row{r}_col{c}><|image|>" for r in range(2) for c in range(3))
    assert text == "Q: <global_img><|image|>" + crops + " what?"
    # The global image is the whole page at 56 px; crop (r, c) is that window of the page at 2x3 * 56 px.
    whole = processor._to_tensor(page.convert("RGB"), 56, 56)
    big = processor._to_tensor(page.convert("RGB"), 112, 168)
    assert torch.equal(pixels[0], whole)
    assert torch.equal(pixels[1 + 3 + 2], big[:, 56:112, 112:168])
    plain = DocProcessor(image_size=56, add_textual_crop_indicator=False)
    assert plain(page, "<|image|>")[2] == "<|image|>" * 7


def test_the_tiny_batch_has_one_placeholder_per_crop(docowl):
    model, batch = docowl
    assert ((batch["input_ids"] == IMAGE_TOKEN) & batch["attention_mask"].bool()).sum(dim=1).tolist() == list(CROPS)
    assert batch["pixel_values"].shape[0] == sum(CROPS)
    assert model.config.tokens_per_crop == PER_CROP


# ---- the model -------------------------------------------------------------------------------------------------

def test_257_tokens_per_crop_at_448_px_with_a_real_width_vit():
    config = DocOwlConfig(vision_config=dict(num_hidden_layers=1), text_config=dict(hidden_size=64,
                          num_attention_heads=4, intermediate_size=128, num_hidden_layers=1, vocab_size=256))
    assert config.tokens_per_crop == 257 == 32 * 8 + 1
    torch.manual_seed(0)
    vit = MplugOwlVisionModel(config.vision_config).eval()
    reducer = MplugDocOwlHReducerModel(config.hreducer_config, 64).eval()
    with torch.no_grad():
        features = vit(torch.randn(2, 3, 448, 448)).last_hidden_state
        tokens = reducer(features)
    assert features.shape == (2, 1 + 1024, 1024)
    assert tokens.shape == (2, 257, 64)
    assert torch.equal(tokens[:, -1], reducer.vit_eos[0].expand(2, -1))  # the eos closes every crop


def test_h_reducer_merges_four_horizontal_neighbours():
    """A token depends on its own 1x4 patch window only (each conv strides over its 1x4 kernel)."""
    torch.manual_seed(0)
    config = DocOwlConfig(vision_config=dict(hidden_size=8, image_size=56, patch_size=7),
                          hreducer_config=dict(hidden_size=8), text_config=dict(hidden_size=16,
                          num_attention_heads=2, intermediate_size=32, num_hidden_layers=1, vocab_size=32))
    reducer = MplugDocOwlHReducerModel(config.hreducer_config, 16).eval()
    features = torch.randn(1, 1 + 64, 8)
    changed = features.clone()
    changed[0, 1 + 3 * 8 + 5] += 1.0  # patch (row 3, col 5) -> token (3, 1)
    with torch.no_grad():
        diff = (reducer(changed) - reducer(features)).abs().sum(-1)[0]  # (8 * 2 + 1,)
    assert diff.nonzero().flatten().tolist() == [3 * 2 + 1]


def test_placeholders_become_features_and_indicators(docowl):
    model, batch = docowl
    calls = _text_inputs(model, **batch)
    assert len(calls) == 1
    kwargs = calls[0]
    embeds, mask, indicators = kwargs["inputs_embeds"], kwargs["attention_mask"], kwargs["modality_indicators"]
    real = batch["attention_mask"].sum(dim=1)
    lengths = real + torch.tensor(CROPS) * (PER_CROP - 1)
    assert embeds.shape[1] == int(lengths.max())
    assert mask.sum(dim=1).tolist() == lengths.tolist()
    assert bool(mask[:, -1].all()) and bool((mask.diff(dim=1) >= 0).all())  # left padding
    assert (indicators == 1).sum(dim=1).tolist() == [c * PER_CROP for c in CROPS]
    assert not bool((indicators.bool() & ~mask.bool()).any())
    with torch.no_grad():
        features = model.model.get_image_features(batch["pixel_values"])  # (10, 17, D)
    assert torch.equal(embeds[indicators == 1].view(-1, PER_CROP, embeds.shape[-1]), features)
    # Text: the ids' own embeddings in order, every indicator token (240, 241, ...) included.
    ids = batch["input_ids"][batch["attention_mask"].bool() & (batch["input_ids"] != IMAGE_TOKEN)]
    text = (indicators == 0) & mask.bool()
    assert torch.equal(embeds[text], model.get_input_embeddings()(ids))
    # Each crop's run of 17 follows its indicator's last text token.
    row = indicators[0].tolist()
    starts = [i for i in range(1, len(row)) if row[i] == 1 and row[i - 1] == 0]
    assert len(starts) == CROPS[0] and all(row[s:s + PER_CROP] == [1] * PER_CROP for s in starts)


def test_decode_steps_are_text(docowl):
    model, batch = docowl
    calls = _text_inputs(model, **batch, max_new_tokens=3, do_sample=False)
    prefill, decodes = calls[0], calls[1:]
    assert len(decodes) == 2
    length = prefill["inputs_embeds"].shape[1]
    for step, kwargs in enumerate(decodes, start=1):
        assert kwargs["modality_indicators"].shape == (3, 1) and not bool(kwargs["modality_indicators"].any())
        assert kwargs["attention_mask"].shape == (3, length + step)  # the expanded mask, continued
        assert torch.equal(kwargs["position_ids"][:, 0], prefill["position_ids"][:, -1] + step)


@pytest.mark.parametrize("generate", [
    dict(do_sample=False),
    dict(do_sample=True, top_k=5),
    dict(do_sample=False, num_beams=3, num_return_sequences=2),
])
def test_generate_in_a_batch_equals_each_sample_alone(docowl, generate):
    model, batch = docowl
    from tests.support.vlm_factory import select_samples

    per_sample = generate.get("num_return_sequences", 1)
    with torch.no_grad():
        batched = model.generate(**batch, max_new_tokens=3, **generate)
        assert batched.shape == (3 * per_sample, batch["input_ids"].shape[1] + 3)
        if generate["do_sample"]:
            return  # sampled tokens depend on the draws; that it runs on a padded batch is the check
        cache_free = model.generate(**batch, max_new_tokens=3, use_cache=False, **generate)
        assert torch.equal(cache_free, batched)
        for row in range(3):
            alone = model.generate(**select_samples(batch, row), max_new_tokens=3, **generate)
            assert torch.equal(alone[:, -3:], batched[row * per_sample:(row + 1) * per_sample, -3:])


def test_eager_and_sdpa_agree(docowl):
    model, batch = docowl
    with torch.no_grad():
        eager = model(**batch).logits
        model.set_attn_implementation("sdpa")
        try:
            assert model.model.language_model.config._attn_implementation == "sdpa"
            assert model.model.vision_model.config._attn_implementation == "sdpa"
            sdpa = model(**batch).logits
        finally:
            model.set_attn_implementation("eager")
    mask = _text_inputs(model, **batch)[0]["attention_mask"].bool()
    assert torch.allclose(eager[mask], sdpa[mask], atol=1e-5, rtol=0)


def test_the_placeholder_count_must_match_the_crops(docowl):
    model, batch = docowl
    with pytest.raises(ValueError, match="10 image placeholders .* but 9 crops"):
        model(**{**batch, "pixel_values": batch["pixel_values"][:9]})


# ---- the adapter -----------------------------------------------------------------------------------------------

def test_the_adapter_is_chosen_from_the_config(docowl):
    model, batch = docowl
    assert ADAPTERS["mplug_docowl"] is DocOwlAdapter
    adapter = get_adapter(model)
    assert isinstance(adapter, DocOwlAdapter)
    assert adapter.multimodal_model is model.model
    assert adapter.text_model is model.model.language_model
    assert adapter.vision_tower is model.model.vision_model
    assert adapter.vision_token_ids() == (IMAGE_TOKEN,)
    assert adapter.per_token_layer_kwargs == ("modality_indicators",)
    assert adapter.count_vision_tokens(batch["input_ids"]).tolist() == [c * PER_CROP for c in CROPS]
    assert DocOwlAdapter(model.model).text_model is model.model.language_model  # the inner model is accepted
    indicators = torch.tensor([[0, 1, 1, 0]])
    assert adapter.text_vision_mask({"modality_indicators": indicators}).tolist() == [[False, True, True, False]]
    assert adapter.text_vision_mask({}) is None


def test_the_adapter_refuses_other_families():
    with pytest.raises(TypeError, match="DocOwlAdapter serves model type 'mplug_docowl', but .* is 'llava'"):
        DocOwlAdapter(tiny_llava("sdpa", layers=2))


def test_checkpoints_load_with_the_class_the_adapter_names(docowl, tmp_path):
    model, batch = docowl
    assert model_class_for(model.config) is DocOwlForConditionalGeneration
    with pytest.raises(ValueError, match="mmreduce never loads"):
        DocOwlAdapter.model_class(tiny_llava("sdpa", layers=2).config)
    model.save_pretrained(tmp_path)
    loaded = load_pretrained(tmp_path, attn_implementation="eager").eval()
    assert type(loaded) is DocOwlForConditionalGeneration
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, model(**batch).logits)


def test_probe_matches_eager_attention_weights_with_modality_routing(docowl):
    """The probe's row equals the eager weights of the layer; without routing (every token through the text branch)
    it does not, so the routing is what makes it equal."""
    model, batch = docowl
    adapter = get_adapter(model)
    layer = model.model.language_model.layers[2]
    captured = {}
    handles = [
        layer.register_forward_pre_hook(lambda m, a, k: captured.update(args=a, kwargs=k), with_kwargs=True),
        layer.self_attn.register_forward_hook(lambda m, a, out: captured.update(weights=out[1])),
    ]
    try:
        with torch.no_grad():
            model(**batch)
    finally:
        for handle in handles:
            handle.remove()
    args, kwargs = captured["args"], captured["kwargs"]
    hidden = args[0] if args else kwargs["hidden_states"]
    query = torch.full((hidden.shape[0],), hidden.shape[1] - 1)
    valid = _text_inputs(model, **batch)[0]["attention_mask"].bool()  # the expanded prompt's real tokens
    with torch.no_grad():
        probe = adapter.attention_probe(layer, hidden, query, kwargs["position_embeddings"], valid, layer_kwargs=kwargs)
        unrouted = adapter.attention_probe(layer, hidden, query, kwargs["position_embeddings"], valid)
    eager = captured["weights"][:, :, -1, :].float()  # (B, H, T)
    assert probe.shape == eager.shape
    assert torch.allclose(probe, eager, atol=1e-5, rtol=0)
    assert (unrouted - eager).abs().max() > 1e-3


def test_wrapped_stats_count_the_expanded_tokens(docowl):
    model, batch = docowl
    with torch.no_grad(), mmreduce.wrap(model, "fastv", layer=2, keep_ratio=0.25) as reduced:
        reduced.generate(**batch, max_new_tokens=2, do_sample=False)
        stats = reduced.stats
    initial = [c * PER_CROP for c in CROPS]
    assert stats.initial_vision_tokens == initial
    assert stats.vision_tokens_per_layer == [[n, n, -(-n // 4), -(-n // 4)] for n in initial]


def test_stats_name_the_vision_positions_the_text_model_saw(docowl):
    """Placeholders are expanded before the LLM: the stats' positions are the expanded prompt's vision tokens, the
    ones `kept_positions` index into (what the demo's overlays need), not the placeholders of `input_ids`."""
    model, batch = docowl
    seen = {}

    def record(module, args, kwargs):
        seen.setdefault("indicators", kwargs["modality_indicators"])

    handle = model.model.language_model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        with torch.no_grad(), mmreduce.wrap(model, "fastv", layer=2, keep_ratio=0.25) as reduced:
            reduced(**batch)
            stats = reduced.stats
    finally:
        handle.remove()
    expected = [row.nonzero().flatten().tolist() for row in seen["indicators"] == 1]
    assert stats.vision_positions == expected and [len(p) for p in expected] == stats.initial_vision_tokens
    for layer, kept in stats.kept_positions.items():
        assert all(set(k) <= set(p) for k, p in zip(kept, expected)), layer


# ---- DocOwl 1.5's real widths ----------------------------------------------------------------------------------

def _available_gib() -> float:
    try:
        with open("/proc/meminfo") as info:
            fields = dict(line.split(":", 1) for line in info)
        return int(fields["MemAvailable"].split()[0]) / 2**20
    except (OSError, KeyError, ValueError):
        return float("inf")


@pytest.mark.slow
@pytest.mark.skipif(_available_gib() < 8, reason="the real-width stand-in needs ~4 GB in float32 (plus activations)")
def test_docowl_1_5_widths_end_to_end(capsys):
    """ViT 1024 wide / 16 heads / 448 px patch 14 (one layer), H-Reducer 1x4, LLM 4096 wide / 32 heads /
    intermediate 11008 (two layers: the least in which a token can be dropped, since layer 0 never is), random
    weights in float32; one page cut 2x2 + global = 5 x 257 = 1285 vision tokens; `fastv` and `pdrop` generate 2
    tokens."""
    torch.manual_seed(0)
    config = DocOwlConfig(vision_config=dict(num_hidden_layers=1), text_config=dict(num_hidden_layers=2))
    text = config.text_config
    assert (text.hidden_size, text.num_attention_heads, text.intermediate_size) == (4096, 32, 11008)
    model = DocOwlForConditionalGeneration(config).eval()
    processor = DocProcessor()
    pixels, _, prompt = processor(_page(896, 896), "<|image|>What is the title?")
    assert prompt.count("<|image|>") == 5 and prompt.startswith("<global_img><|image|><crop_img_row0_col0>")
    ids = [1, 3148, 1001]  # stand-in token ids; indicators are text, each placeholder one id
    for piece in prompt.split("<|image|>")[:-1]:
        ids += [29871 + len(piece) % 7, 29900 + len(piece) % 5, config.image_token_id]
    ids += [1724, 338, 278, 3611, 29973]
    input_ids = torch.tensor([ids])
    batch = dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), pixel_values=pixels)
    vision, text_tokens = 5 * 257, input_ids.shape[1] - 5
    dims = ModelDims.from_config(text)

    def ratio(kept: int) -> float:
        full = layer_flops(text_tokens + vision, dims)
        return (full + layer_flops(text_tokens + kept, dims)) / (2 * full)

    rows = []
    runs = (("baseline", {}, vision), ("fastv", dict(layer=1, keep_ratio=0.25), 322),
            ("pdrop", dict(layers=(1,), keep_ratio=0.5), 643))
    for name, fields, kept in runs:
        start = time.perf_counter()
        with torch.no_grad(), mmreduce.wrap(model, name, **fields) as reduced:
            out = reduced.generate(**batch, max_new_tokens=2, do_sample=False)
            stats = reduced.stats
        seconds = time.perf_counter() - start
        assert out.shape == (1, input_ids.shape[1] + 2)
        assert stats.initial_vision_tokens == [vision] and stats.text_tokens == [text_tokens]
        assert stats.vision_tokens_per_layer == [[vision, kept]]
        flops = stats.prefill_flops / stats.baseline_prefill_flops
        assert flops == pytest.approx(ratio(kept), rel=1e-12)
        rows.append(f"{name}: vision tokens per layer {stats.vision_tokens_per_layer[0]}, prefill FLOPs "
                    f"{stats.prefill_flops / 1e12:.3f} T ({flops:.3f} of baseline), generate {seconds:.1f} s "
                    f"(prefill {stats.prefill_ms / 1e3:.1f} s, vision {stats.vision_ms / 1e3:.1f} s)")
    with capsys.disabled():
        print("\nDocOwl 1.5 widths, 1 ViT + 2 LLM layers, float32:\n  " + "\n  ".join(rows))
