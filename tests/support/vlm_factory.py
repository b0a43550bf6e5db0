"""Tiny random-weight VLMs built from configs (no hub), and prompts with left padding.

`VLM_BUILDERS` maps every `config.model_type` that mmreduce has an adapter for to a function building a tiny model
of that family and a left-padded batch for it; the invariant matrix (tests/core/test_invariants.py) runs every
adapter in `mmreduce.adapters.ADAPTERS` through it, so a new adapter needs one entry here.
"""

from __future__ import annotations

from typing import Callable

import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
)

__all__ = [
    "BOS_TOKEN",
    "IMAGE_TOKEN",
    "PAD_TOKEN",
    "VLM_BUILDERS",
    "VOCAB",
    "build_vlm",
    "llava_batch",
    "llava_next_batch",
    "qwen2_vl_batch",
    "qwen2_vl_video_batch",
    "select_samples",
    "tiny_llava",
    "tiny_llava_next",
    "tiny_qwen2_5_vl",
    "tiny_qwen2_vl",
]

IMAGE_TOKEN = 250
PAD_TOKEN = 0
BOS_TOKEN = 1
VOCAB = 256


def _text_config(layers: int = 6) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,  # GQA on purpose: the probe must repeat k/v heads
        max_position_embeddings=512,
        pad_token_id=PAD_TOKEN,
        bos_token_id=BOS_TOKEN,
        eos_token_id=2,
    )


def tiny_llava(attn: str = "sdpa", layers: int = 6, seed: int = 0) -> LlavaForConditionalGeneration:
    """CLIP 32 px / patch 4 -> 64 vision tokens per image; Llama with GQA."""
    torch.manual_seed(seed)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
            patch_size=4,
        ),
        text_config=_text_config(layers),
        image_token_id=IMAGE_TOKEN,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    model = LlavaForConditionalGeneration(config).eval()
    model.set_attn_implementation(attn)
    _sharpen(model)
    return model


def tiny_llava_next(attn: str = "sdpa", layers: int = 6, seed: int = 0) -> LlavaNextForConditionalGeneration:
    """CLIP 32 px / patch 8, anyres grid pinpoints up to 64 px: base image + crops + newline tokens."""
    torch.manual_seed(seed)
    config = LlavaNextConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
            patch_size=8,
        ),
        text_config=_text_config(layers),
        image_token_id=IMAGE_TOKEN,
        image_grid_pinpoints=[[32, 64], [64, 32], [64, 64]],
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    model = LlavaNextForConditionalGeneration(config).eval()
    model.set_attn_implementation(attn)
    _sharpen(model)
    return model


def _sharpen(model) -> None:
    """Random init gives near-uniform attention; larger q/k weights make the rankings (and drops) matter.
    Generating the image placeholder would break any recomputing (cache-free) decode, stock or not: suppress it."""
    model.generation_config.suppress_tokens = [IMAGE_TOKEN]
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            layer.self_attn.q_proj.weight.mul_(4.0)
            layer.self_attn.k_proj.weight.mul_(4.0)


def llava_batch(prompt_lengths=((3, 5), (1, 2), (6, 9)), images_per_sample=1, tokens_per_image=64, seed=0):
    """Left-padded batch: each sample is BOS + text_before + image tokens + text_after.

    Returns dict(input_ids (B, T), attention_mask (B, T), pixel_values (B*images, 3, 32, 32)).
    """
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for before, after in prompt_lengths:
        text_before = torch.randint(3, 200, (before,), generator=generator).tolist()
        text_after = torch.randint(3, 200, (after,), generator=generator).tolist()
        rows.append([BOS_TOKEN] + text_before + [IMAGE_TOKEN] * (tokens_per_image * images_per_sample) + text_after)
    pixel_values = torch.randn(len(rows) * images_per_sample, 3, 32, 32, generator=generator)
    return {**_left_pad(rows), "pixel_values": pixel_values}


def _left_pad(rows: list[list[int]]) -> dict:
    """input_ids (B, T) left-padded with PAD_TOKEN and the matching attention_mask."""
    length = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), length), PAD_TOKEN)
    attention_mask = torch.zeros(len(rows), length, dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, length - len(row):] = torch.tensor(row)
        attention_mask[i, length - len(row):] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def llava_next_batch(model, image_sizes=((48, 64), (60, 30), (50, 50)), prompt_lengths=((3, 5), (1, 2), (6, 9)), seed=0):
    """Left-padded LLaVA-NeXT batch with images of different sizes, so samples have different vision counts.

    Returns dict(input_ids, attention_mask, pixel_values (B, patches, 3, 32, 32), image_sizes (B, 2)).
    """
    from PIL import Image
    from transformers import LlavaNextImageProcessor

    generator = torch.Generator().manual_seed(seed)
    processor = LlavaNextImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
        image_grid_pinpoints=model.config.image_grid_pinpoints,
    )
    images = []
    for h, w in image_sizes:
        array = (torch.rand(h, w, 3, generator=generator) * 255).to(torch.uint8).numpy()
        images.append(Image.fromarray(array))
    processed = processor(images=images, return_tensors="pt")
    with torch.no_grad():
        features = model.model.get_image_features(
            pixel_values=processed["pixel_values"], image_sizes=processed["image_sizes"],
            vision_feature_layer=-1, vision_feature_select_strategy="default",
        ).pooler_output
    counts = [int(f.shape[0]) for f in features]
    rows = []
    for (before, after), count in zip(prompt_lengths, counts):
        text_before = torch.randint(3, 200, (before,), generator=generator).tolist()
        text_after = torch.randint(3, 200, (after,), generator=generator).tolist()
        rows.append([BOS_TOKEN] + text_before + [IMAGE_TOKEN] * count + text_after)
    return {**_left_pad(rows), "pixel_values": processed["pixel_values"], "image_sizes": processed["image_sizes"]}


def select_samples(batch: dict, index: int) -> dict:
    """Sample `index` of a left-padded batch, alone and unpadded."""
    if "mm_token_type_ids" in batch:
        return _select_qwen_sample(batch, index)
    keep = batch["attention_mask"][index].bool()
    single = {"input_ids": batch["input_ids"][index][keep][None], "attention_mask": batch["attention_mask"][index][keep][None]}
    if "image_sizes" in batch:
        single["pixel_values"] = batch["pixel_values"][index:index + 1]
        single["image_sizes"] = batch["image_sizes"][index:index + 1]
    else:
        # Pixel rows in proportion to each sample's vision tokens: LLaVA-1.5 (equal shares) and InternVL (tiles x
        # tokens per tile; tile counts differ between samples).
        counts = ((batch["input_ids"] == IMAGE_TOKEN) & batch["attention_mask"].bool()).sum(dim=1).tolist()
        rows = batch["pixel_values"].shape[0]
        start, stop = (rows * sum(counts[:i]) // sum(counts) for i in (index, index + 1))
        single["pixel_values"] = batch["pixel_values"][start:stop]
    return single


def _llava_with_batch(attn: str, layers: int) -> tuple[LlavaForConditionalGeneration, dict]:
    return tiny_llava(attn, layers=layers), llava_batch()


def _llava_next_with_batch(attn: str, layers: int) -> tuple[LlavaNextForConditionalGeneration, dict]:
    model = tiny_llava_next(attn, layers=layers)
    return model, llava_next_batch(model)


def tiny_internvl_with_batch(attn: str = "sdpa", layers: int = 6, seed: int = 0,
                             image_sizes=((56, 112), (56, 56), (112, 112)), prompt_lengths=((3, 5), (1, 2), (6, 9)),
                             img_start: int = 251, img_end: int = 252):
    """Tiny InternVL and a left-padded batch of three prompts BOS + text + `<img>` + context x n + `</img>` + text.

    Vision: 56 px tiles, patch 7 -> 8x8 patches, pixel shuffle 0.5 -> 16 tokens per tile. Text: Qwen2 with GQA;
    its q/k/v biases get random values (they start at zero) so the probe is checked with them. The tiles are made
    as the InternVL processor makes them (GotOcr2 `crop_to_patches`, at most 4 crops, the thumbnail last, none for
    a one-tile image): the default sizes give 3, 1 and 5 tiles = 48, 16 and 80 context tokens. Only the context
    id is `IMAGE_TOKEN`; `<img>` / `</img>` (`img_start` / `img_end`) are text.

    Returns (model, dict(input_ids (3, T), attention_mask (3, T), pixel_values (tiles, 3, 56, 56))): the tiles of
    every sample in prompt order, concatenated as the processor does. The samples' tile counts differ: a sample's
    tiles start at row (context tokens of the samples before it) / 16, not at an equal share of `pixel_values`.
    """
    from PIL import Image
    from transformers import (
        GotOcr2ImageProcessor, InternVLConfig, InternVLForConditionalGeneration, InternVLVisionConfig, Qwen2Config,
    )

    torch.manual_seed(seed)
    config = InternVLConfig(
        vision_config=InternVLVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=56,
            patch_size=7,
        ),
        text_config=Qwen2Config(
            vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, pad_token_id=PAD_TOKEN, bos_token_id=BOS_TOKEN,
            eos_token_id=2,
        ),
        image_token_id=IMAGE_TOKEN,
        image_seq_length=16,
        downsample_ratio=0.5,
    )
    model = InternVLForConditionalGeneration(config).eval()
    model.set_attn_implementation(attn)
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0.0, 0.2)
    _sharpen(model)

    generator = torch.Generator().manual_seed(seed)
    processor = GotOcr2ImageProcessor(size={"height": 56, "width": 56}, crop_to_patches=True, min_patches=1,
                                      max_patches=4)
    images = [Image.fromarray((torch.rand(h, w, 3, generator=generator) * 255).to(torch.uint8).numpy())
              for h, w in image_sizes]
    processed = processor(images=images, return_tensors="pt")
    with torch.no_grad():
        features = model.model.get_image_features(pixel_values=processed["pixel_values"][:1]).pooler_output
    tokens_per_tile = features.shape[1]
    rows = []
    for (before, after), tiles in zip(prompt_lengths, processed["num_patches"].tolist()):
        text_before = torch.randint(3, 200, (before,), generator=generator).tolist()
        text_after = torch.randint(3, 200, (after,), generator=generator).tolist()
        image = [img_start] + [IMAGE_TOKEN] * (tokens_per_tile * tiles) + [img_end]
        rows.append([BOS_TOKEN] + text_before + image + text_after)
    return model, {**_left_pad(rows), "pixel_values": processed["pixel_values"]}


# ---- Qwen2-VL / Qwen2.5-VL -----------------------------------------------------------------------------------------
# Prompt layout of the Qwen2-VL processor: <|vision_start|> + N x <|image_pad|> + <|vision_end|> (a video uses
# <|video_pad|>), N = t*h*w / merge^2 of the image's patch grid; `mm_token_type_ids` is 1 on image pads, 2 on video
# pads. The image pad is IMAGE_TOKEN; the other ids are free ids of the tiny vocabulary.
QWEN_VIDEO_TOKEN = 251
QWEN_VISION_START = 252
QWEN_VISION_END = 253


def _qwen_text_config(layers: int) -> dict:
    """Qwen2 text stack with GQA; head_dim 16, so the M-RoPE sections (t, h, w) split its 8 frequencies 2/3/3."""
    return dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
        pad_token_id=PAD_TOKEN, bos_token_id=BOS_TOKEN, eos_token_id=2,
    )


def _qwen_ids() -> dict:
    return dict(image_token_id=IMAGE_TOKEN, video_token_id=QWEN_VIDEO_TOKEN, vision_start_token_id=QWEN_VISION_START,
                vision_end_token_id=QWEN_VISION_END)


def _finish_qwen(model, attn: str):
    model = model.eval()
    model.set_attn_implementation(attn)
    _sharpen(model)
    # A generated video pad would count as a vision token when a cache-free generate() recomputes the prompt.
    model.generation_config.suppress_tokens = [IMAGE_TOKEN, QWEN_VIDEO_TOKEN]
    return model


def tiny_qwen2_vl(attn: str = "sdpa", layers: int = 6, seed: int = 0):
    """Qwen2-VL: ViT patch 4, 2x2 merge (one vision token per 8x8 pixels), 2 blocks of width 32; Qwen2 with GQA."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    torch.manual_seed(seed)
    config = Qwen2VLConfig(
        vision_config=dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=4,
                           spatial_merge_size=2, temporal_patch_size=2),
        text_config=_qwen_text_config(layers),
        **_qwen_ids(),
    )
    return _finish_qwen(Qwen2VLForConditionalGeneration(config), attn)


def tiny_qwen2_5_vl(attn: str = "sdpa", layers: int = 6, seed: int = 0):
    """Qwen2.5-VL: as `tiny_qwen2_vl`, with its own ViT (RMSNorm, gated MLP, 16-pixel windows = 2x2 merged tokens,
    full attention in block 1 only)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    config = Qwen2_5_VLConfig(
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                           patch_size=4, spatial_merge_size=2, temporal_patch_size=2, window_size=16,
                           fullatt_block_indexes=[1], tokens_per_second=2),
        text_config=_qwen_text_config(layers),
        **_qwen_ids(),
    )
    return _finish_qwen(Qwen2_5_VLForConditionalGeneration(config), attn)


def _qwen_sizes(model) -> dict:
    vision = model.config.vision_config
    return dict(patch_size=vision.patch_size, merge_size=vision.spatial_merge_size,
                temporal_patch_size=vision.temporal_patch_size,
                size={"shortest_edge": 16 * 16, "longest_edge": 64 * 64})


def _qwen_rows(prompt_lengths, counts, pad_token: int, generator) -> dict:
    """Left-padded rows BOS + text + <vision_start> + count x pad_token + <vision_end> + text, with
    mm_token_type_ids (1 on image pads, 2 on video pads)."""
    rows = []
    for (before, after), count in zip(prompt_lengths, counts):
        text_before = torch.randint(3, 200, (before,), generator=generator).tolist()
        text_after = torch.randint(3, 200, (after,), generator=generator).tolist()
        rows.append([BOS_TOKEN] + text_before + [QWEN_VISION_START] + [pad_token] * count + [QWEN_VISION_END]
                    + text_after)
    batch = _left_pad(rows)
    ids = batch["input_ids"]
    batch["mm_token_type_ids"] = (ids == IMAGE_TOKEN).long() + 2 * (ids == QWEN_VIDEO_TOKEN).long()
    return batch


def qwen2_vl_batch(model, image_sizes=((48, 64), (60, 30), (50, 50)), prompt_lengths=((3, 5), (1, 2), (6, 9)),
                   seed=0):
    """Left-padded Qwen2-VL / Qwen2.5-VL batch, one image per prompt, images of different sizes (48, 32 and 36
    vision tokens), laid out by the family's own image processor.

    Returns dict(input_ids (B, T), attention_mask (B, T), mm_token_type_ids (B, T), pixel_values (patches of all
    images, 3 * temporal_patch * patch^2), image_grid_thw (B, 3)).
    """
    from PIL import Image
    from transformers import Qwen2VLImageProcessorPil

    generator = torch.Generator().manual_seed(seed)
    processor = Qwen2VLImageProcessorPil(**_qwen_sizes(model))
    images = []
    for h, w in image_sizes:
        images.append(Image.fromarray((torch.rand(h, w, 3, generator=generator) * 255).to(torch.uint8).numpy()))
    processed = processor(images=images, return_tensors="pt")
    merge = model.config.vision_config.spatial_merge_size
    counts = (processed["image_grid_thw"].prod(dim=-1) // merge**2).tolist()
    batch = _qwen_rows(prompt_lengths, counts, IMAGE_TOKEN, generator)
    return {**batch, "pixel_values": processed["pixel_values"], "image_grid_thw": processed["image_grid_thw"]}


def qwen2_vl_video_batch(model, video_sizes=((4, 40, 48), (6, 32, 32)), prompt_lengths=((3, 5), (1, 2)), seed=0):
    """Left-padded batch, one video of (frames, height, width) per prompt, laid out by the family's video processor
    (4 x 40x48 -> t=2, 10x12 patches, 60 video tokens; 6 x 32x32 -> t=3, 8x8 patches, 48 video tokens).

    Returns dict(input_ids, attention_mask, mm_token_type_ids (2 on the video pads), pixel_values_videos,
    video_grid_thw (B, 3)).
    """
    from transformers import Qwen2VLVideoProcessor

    generator = torch.Generator().manual_seed(seed)
    processor = Qwen2VLVideoProcessor(**_qwen_sizes(model), cap_pixels_per_frame=False)
    videos = [(torch.rand(*size, 3, generator=generator) * 255).to(torch.uint8).numpy() for size in video_sizes]
    processed = processor(videos=videos, return_tensors="pt")
    merge = model.config.vision_config.spatial_merge_size
    counts = (processed["video_grid_thw"].prod(dim=-1) // merge**2).tolist()
    batch = _qwen_rows(prompt_lengths, counts, QWEN_VIDEO_TOKEN, generator)
    return {**batch, "pixel_values_videos": processed["pixel_values_videos"],
            "video_grid_thw": processed["video_grid_thw"]}


def _select_qwen_sample(batch: dict, index: int) -> dict:
    """Sample `index` of a Qwen2-VL batch, alone and unpadded: its rows, and the patches and grids of its own images
    and videos (each run of pads in `mm_token_type_ids` is one image or video, in batch order)."""
    keep = batch["attention_mask"][index].bool()
    single = {key: batch[key][index][keep][None] for key in ("input_ids", "attention_mask", "mm_token_type_ids")}
    for kind, pixels, grids in ((1, "pixel_values", "image_grid_thw"), (2, "pixel_values_videos", "video_grid_thw")):
        if grids not in batch:
            continue
        runs = [int(((row == kind) & (torch.nn.functional.pad(row, (1, 0))[:-1] != kind)).sum())
                for row in batch["mm_token_type_ids"]]
        first, count = sum(runs[:index]), runs[index]
        patches = batch[grids].prod(dim=-1)
        start = int(patches[:first].sum())
        single[grids] = batch[grids][first:first + count]
        single[pixels] = batch[pixels][start:start + int(patches[first:first + count].sum())]
    return single


def _qwen2_vl_with_batch(attn: str, layers: int):
    model = tiny_qwen2_vl(attn, layers=layers)
    return model, qwen2_vl_batch(model)


def _qwen2_5_vl_with_batch(attn: str, layers: int):
    model = tiny_qwen2_5_vl(attn, layers=layers)
    return model, qwen2_vl_batch(model)


def tiny_docowl_with_batch(attn: str = "sdpa", layers: int = 6, seed: int = 0,
                           image_sizes=((56, 112), (56, 56), (112, 112)), prompt_lengths=((3, 5), (1, 2), (6, 9))):
    """Tiny mPLUG-DocOwl 1.5 stand-in (`mmreduce.eval.docowl`) and a left-padded batch of three pages.

    Vision: 56 px crops, patch 7 -> 8x8 patches, H-Reducer 1x4 -> 8x2 + eos = 17 tokens per crop. Text: the
    modality-adaptive Llama with GQA; each layer's text and vision norms get different random weights, so routing a
    token through the wrong branch changes the result. Pages are cut by the stand-in's `DocProcessor` (global image
    first): the default sizes give anchors 1x2, 1x1 and 2x2 = 3, 2 and 5 crops = 51, 34 and 85 vision tokens once
    expanded. Each prompt is BOS + text + (indicator + placeholder) per crop + text, the placeholder being
    `IMAGE_TOKEN` (one id per crop, expanded inside the model); the indicators are text: `<global_img>` -> 240,
    `<crop_img_rowR_colC>` -> 241, 242 + R, 246 + C.

    Returns (model, dict(input_ids (3, T), attention_mask (3, T), pixel_values (10, 3, 56, 56))): the crops of every
    sample in prompt order.
    """
    import re

    from PIL import Image

    from mmreduce.eval.docowl import DocOwlConfig, DocOwlForConditionalGeneration, DocProcessor

    torch.manual_seed(seed)
    config = DocOwlConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=56, patch_size=7),
        hreducer_config=dict(hidden_size=32, conv_shape="1x4"),
        text_config=dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         pad_token_id=PAD_TOKEN, bos_token_id=BOS_TOKEN, eos_token_id=2),
        image_token_id=IMAGE_TOKEN,
    )
    model = DocOwlForConditionalGeneration(config).eval()
    model.set_attn_implementation(attn)
    model.generation_config.suppress_tokens = [IMAGE_TOKEN]  # a generated placeholder could not be expanded
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                for branch in norm.multiway:
                    branch.weight.copy_(1.0 + 0.5 * torch.randn_like(branch.weight))
            layer.self_attn.q_proj.weight.mul_(4.0)
            for branch in layer.self_attn.k_proj.multiway:
                branch.weight.mul_(4.0)

    generator = torch.Generator().manual_seed(seed)
    processor = DocProcessor(image_size=56)

    def indicator(text: str) -> list[int]:
        if text == "<global_img>":
            return [240]
        row, col = (int(x) for x in re.fullmatch(r"<crop_img_row(\d+)_col(\d+)>", text).groups())
        return [241, 242 + row, 246 + col]

    rows, pixels = [], []
    for (before, after), (h, w) in zip(prompt_lengths, image_sizes):
        page = Image.fromarray((torch.rand(h, w, 3, generator=generator) * 255).to(torch.uint8).numpy())
        panels, _, text = processor(page, "<|image|>")
        image = [token for piece in text.split("<|image|>")[:-1] for token in indicator(piece) + [IMAGE_TOKEN]]
        text_before = torch.randint(3, 200, (before,), generator=generator).tolist()
        text_after = torch.randint(3, 200, (after,), generator=generator).tolist()
        rows.append([BOS_TOKEN] + text_before + image + text_after)
        pixels.append(panels)
    return model, {**_left_pad(rows), "pixel_values": torch.cat(pixels)}


# config.model_type -> (attn implementation, decoder layers) -> (tiny model of that family, left-padded batch).
VLM_BUILDERS: dict[str, Callable[[str, int], tuple[torch.nn.Module, dict]]] = {
    "internvl": tiny_internvl_with_batch,
    "mplug_docowl": tiny_docowl_with_batch,
    "llava": _llava_with_batch,
    "llava_next": _llava_next_with_batch,
    "qwen2_vl": _qwen2_vl_with_batch,
    "qwen2_5_vl": _qwen2_5_vl_with_batch,
}


def build_vlm(model_type: str, attn: str = "sdpa", layers: int = 6) -> tuple[torch.nn.Module, dict]:
    """A tiny model whose `config.model_type` is `model_type`, and a batch for it; LookupError saying where to add
    a builder when there is none."""
    if model_type not in VLM_BUILDERS:
        raise LookupError(
            f"no tiny-model builder for model_type {model_type!r}: add one to VLM_BUILDERS in "
            "tests/support/vlm_factory.py (a function (attn, layers) -> (model, batch))"
        )
    return VLM_BUILDERS[model_type](attn, layers)
