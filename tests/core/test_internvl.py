"""InternVL (`InternVLForConditionalGeneration`): the adapter's own contract.

The invariant matrix (tests/core/test_invariants.py) runs every method on the tiny InternVL of
tests/support/vlm_factory.py; this file checks what is specific to the family: only the `<IMG_CONTEXT>` tokens are
vision tokens (`<img>` / `</img>` are text and never dropped), the adapter refuses models of another layout, and a
model at InternVL3-1B's real widths, head counts and vision-token counts runs end to end under `fastv` and `pdrop`.
"""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import mmreduce
from mmreduce.adapters import ADAPTERS, get_adapter, load_pretrained, model_class_for
from mmreduce.adapters.internvl import InternVLAdapter
from mmreduce.flops import ModelDims, layer_flops
from tests.support.vlm_factory import IMAGE_TOKEN, tiny_internvl_with_batch, tiny_llava

IMG_START, IMG_END = 251, 252
TILES = (3, 1, 5)  # the builder's default images: 56x112 (2 crops + thumbnail), 56x56 (one tile), 112x112 (4 + 1)
TOKENS_PER_TILE = 16  # 56 px tiles, patch 7 -> 8x8 patches, pixel shuffle 0.5 -> 4x4


@pytest.fixture(scope="module")
def internvl():
    return tiny_internvl_with_batch("sdpa", layers=6, img_start=IMG_START, img_end=IMG_END)


def test_the_adapter_is_chosen_from_the_config(internvl):
    model, _ = internvl
    assert ADAPTERS["internvl"] is InternVLAdapter
    adapter = get_adapter(model)
    assert isinstance(adapter, InternVLAdapter)
    assert adapter.multimodal_model is model.model
    assert adapter.text_model is model.model.language_model
    assert adapter.vision_tower is model.model.vision_tower
    assert adapter.vision_token_ids() == (IMAGE_TOKEN,)


def test_checkpoints_load_with_the_class_the_adapter_names(internvl, tmp_path):
    from transformers import InternVLForConditionalGeneration

    model, batch = internvl
    assert model_class_for(model.config) is InternVLForConditionalGeneration
    model.save_pretrained(tmp_path)
    loaded = load_pretrained(tmp_path, attn_implementation="sdpa").eval()
    assert type(loaded) is InternVLForConditionalGeneration
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, model(**batch).logits)


def test_the_inner_model_is_accepted(internvl):
    model, _ = internvl
    adapter = InternVLAdapter(model.model)
    assert adapter.multimodal_model is model.model
    assert adapter.text_model is model.model.language_model


def test_vision_tokens_are_the_context_tokens_only(internvl):
    model, batch = internvl
    ids, real = batch["input_ids"], batch["attention_mask"].bool()
    mask = InternVLAdapter(model).vision_mask(input_ids=ids)
    assert torch.equal(mask, ids == IMAGE_TOKEN)
    assert mask.sum(dim=1).tolist() == [TOKENS_PER_TILE * tiles for tiles in TILES]
    assert batch["pixel_values"].shape == (sum(TILES), 3, 56, 56)
    for row in range(ids.shape[0]):
        positions = mask[row].nonzero().flatten().tolist()
        first, last = positions[0], positions[-1]
        assert positions == list(range(first, last + 1)), "one contiguous run of context tokens per image"
        assert int(ids[row, first - 1]) == IMG_START and int(ids[row, last + 1]) == IMG_END
        assert not mask[row, first - 1] and not mask[row, last + 1]
        assert int((ids[row][real[row]] == IMG_START).sum()) == int((ids[row][real[row]] == IMG_END).sum()) == 1
    # The embeddings path (no input_ids) finds the same positions.
    embeds = model.get_input_embeddings()(ids)
    assert torch.equal(InternVLAdapter(model).vision_mask(inputs_embeds=embeds), mask)
    # The model itself agrees: one projected feature per context token.
    with torch.no_grad():
        features = model.model.get_image_features(pixel_values=batch["pixel_values"]).pooler_output
    assert tuple(features.shape[:2]) == (sum(TILES), TOKENS_PER_TILE)


def test_the_image_markers_are_kept_as_text(internvl):
    model, batch = internvl
    ids, real = batch["input_ids"], batch["attention_mask"].bool()
    lengths = []  # stream length entering the last decoder layer, at prefill
    last = model.model.language_model.layers[-1]
    hook = last.register_forward_pre_hook(lambda module, args, kwargs: lengths.append(
        (args[0] if args else kwargs["hidden_states"]).shape[1]), with_kwargs=True)
    try:
        with torch.no_grad(), mmreduce.wrap(model, "fastv", layer=2, keep_ratio=0.25) as reduced:
            reduced.generate(**batch, max_new_tokens=2, do_sample=False)
            stats = reduced.stats
    finally:
        hook.remove()
    counts = [TOKENS_PER_TILE * tiles for tiles in TILES]
    assert stats.initial_vision_tokens == counts
    # Text tokens include BOS, the prompt text, <img> and </img>.
    assert stats.text_tokens == (real & (ids != IMAGE_TOKEN)).sum(dim=1).tolist()
    assert stats.vision_tokens_per_layer == [[n, n] + [-(-n // 4)] * 4 for n in counts]
    for row, kept in enumerate(stats.kept_positions[2]):
        assert kept and all(int(ids[row, p]) == IMAGE_TOKEN for p in kept)
    # The shortened stream holds every text token (markers included) and the kept context tokens of the longest row.
    text = (real & (ids != IMAGE_TOKEN)).sum(dim=1)
    assert lengths[0] == max(int(t) + -(-n // 4) for t, n in zip(text, counts))


def _qwen2_vl():
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    config = Qwen2VLConfig(
        vision_config=dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=4),
        text_config=dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}),
    )
    return Qwen2VLForConditionalGeneration(config)


class _Stub(nn.Module):
    def __init__(self, model_type: str):
        super().__init__()
        self.config = SimpleNamespace(model_type=model_type, image_token_id=IMAGE_TOKEN)


@pytest.mark.parametrize("build, message", [
    (lambda: tiny_llava("sdpa", layers=2), "is 'llava'"),
    (_qwen2_vl, "is 'qwen2_vl'"),  # same `.model.language_model.layers` paths: refused by its model type
    (lambda: _Stub("internvl_chat"), "-hf"),  # the remote-code InternVLChatModel
    (lambda: _Stub("internvl"), "has no `.model.vision_tower` and `.model.language_model.layers`"),
], ids=["llava", "qwen2_vl", "internvl_chat", "internvl-without-its-modules"])
def test_the_adapter_refuses_models_it_does_not_fit(build, message):
    model = build()
    with pytest.raises(TypeError, match=re.escape(message)):
        mmreduce.wrap(model, "fastv", adapter="internvl")
    with pytest.raises(TypeError, match=re.escape(message)):
        InternVLAdapter(model)


def test_a_refused_wrap_leaves_the_model_free():
    model = tiny_llava("sdpa", layers=2)
    with pytest.raises(TypeError):
        mmreduce.wrap(model, "fastv", adapter="internvl")
    with mmreduce.wrap(model, "fastv", layer=1) as reduced:  # its own adapter, nothing left over
        assert reduced.adapter.__class__.__name__ == "LlavaAdapter"


def test_an_internvl_model_under_the_llava_adapter(internvl):
    """The LLaVA adapter either refuses an InternVL model (it checks the model type) or, if it accepts it (LLaVA's
    module paths and `image_token_id` are InternVL's too), reduces exactly as the InternVL adapter does."""
    model, batch = internvl
    method = mmreduce.create_method("pdrop", keep_ratio=0.5)
    try:
        reduced = mmreduce.wrap(model, method, adapter="llava")
    except TypeError as refused:
        assert "internvl" in str(refused)
        return
    with torch.no_grad():
        with reduced:
            as_llava = reduced(**batch).logits, reduced.stats.kept_positions
        with mmreduce.wrap(model, method) as own:
            as_internvl = own(**batch).logits, own.stats.kept_positions
    assert torch.equal(as_llava[0], as_internvl[0]) and as_llava[1] == as_internvl[1]


# ---- InternVL3-1B shapes ---------------------------------------------------------------------------------------

# OpenGVLab/InternVL3-1B-hf: InternViT-300M (448 px tiles, patch 14, width 1024, 16 heads, MLP 4096, qkv bias) ->
# pixel shuffle 0.5 -> 256 tokens per tile -> Qwen2.5-0.5B (width 896, 14 heads, 2 KV heads, MLP 4864, vocabulary
# 151674, <img> 151665, </img> 151666, <IMG_CONTEXT> 151667). Only the depths are cut: 1 ViT layer, 2 decoder layers.
REAL_VOCAB, REAL_IMG_START, REAL_IMG_END, REAL_CONTEXT = 151674, 151665, 151666, 151667


def _internvl3_1b_shapes():
    from transformers import InternVLConfig, InternVLForConditionalGeneration, InternVLVisionConfig, Qwen2Config

    torch.manual_seed(0)
    config = InternVLConfig(
        vision_config=InternVLVisionConfig(
            hidden_size=1024, intermediate_size=4096, num_hidden_layers=1, num_attention_heads=16, image_size=448,
            patch_size=14, attention_bias=True,
        ),
        text_config=Qwen2Config(
            vocab_size=REAL_VOCAB, hidden_size=896, intermediate_size=4864, num_hidden_layers=2, num_attention_heads=14,
            num_key_value_heads=2, max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=True,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, bos_token_id=151643,
            eos_token_id=151645,
        ),
        image_token_id=REAL_CONTEXT,
        image_seq_length=256,
        downsample_ratio=0.5,
    )
    model = InternVLForConditionalGeneration(config).eval()
    model.generation_config.suppress_tokens = [REAL_CONTEXT]
    return model


@pytest.mark.slow
def test_internvl3_1b_shapes_end_to_end():
    from PIL import Image
    from transformers import GotOcr2ImageProcessor

    model = _internvl3_1b_shapes()
    processor = GotOcr2ImageProcessor(size={"height": 448, "width": 448}, crop_to_patches=True, min_patches=1,
                                      max_patches=12)
    pixels = (torch.rand(448, 896, 3, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    processed = processor(images=[Image.fromarray(pixels.numpy())], return_tensors="pt")
    assert processed["num_patches"].tolist() == [3]  # a 1:2 image: 2 crops + thumbnail
    vision = 256 * 3
    ids = torch.tensor([[151643, 9707, 11, REAL_IMG_START] + [REAL_CONTEXT] * vision + [REAL_IMG_END, 3838, 374, 419]])
    batch = dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=processed["pixel_values"])
    dims = ModelDims.from_config(model.config.text_config)
    text = 8

    def ratio(kept: int) -> float:  # two decoder layers: all tokens enter layer 0, `kept` vision tokens layer 1
        full = layer_flops(text + vision, dims)
        return (full + layer_flops(text + kept, dims)) / (2 * full)

    runs = (("fastv", dict(layer=1, keep_ratio=0.25), 192), ("pdrop", dict(layers=(1,), keep_ratio=0.5), 384))
    for name, fields, kept in runs:
        with torch.no_grad(), mmreduce.wrap(model, name, **fields) as reduced:
            out = reduced.generate(**batch, max_new_tokens=3, do_sample=False)
            stats = reduced.stats
        assert out.shape == (1, ids.shape[1] + 3)
        assert stats.initial_vision_tokens == [vision] and stats.text_tokens == [text]
        assert stats.vision_tokens_per_layer == [[vision, kept]]
        assert stats.prefill_flops / stats.baseline_prefill_flops == pytest.approx(ratio(kept), rel=1e-12)
        assert stats.prefill_flops < stats.baseline_prefill_flops
