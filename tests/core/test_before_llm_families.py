"""Before-the-LLM reduction on every family, against references that share no code with the engine.

The reference for a reduced prefill is the stock text model (`adapter.text_model` of the UNWRAPPED model) called
directly with inputs built here: the merged embeddings of a stock forward (captured at the text model's door), the
kept tokens chosen from each family's geometry written out below (not the adapter's layout), pooled windows averaged
here, and the mask and position ids written by hand (Qwen's multi-axis positions from its published rule). The
vision-tower signals are checked against the tower's own eager attention weights, and a token's patches against
what the stock model itself says it reads: a token covers the patches whose perturbation changes its embedding.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache

import pytest
import torch
from mmreduce.adapters import ADAPTERS, get_adapter
from mmreduce.adapters.base import END_OF_PANEL, TokenCell

import mmreduce
from mmreduce.before_llm import TowerProbe, token_signals
from mmreduce.methods import Compose, Pool, PyramidDrop, Stride
from mmreduce.methods.before import BeforeLLMMethod, SignalRequest, TokenPlan, VisionTokens
from tests.support.vlm_factory import (
    BOS_TOKEN,
    IMAGE_TOKEN,
    QWEN_VISION_END,
    QWEN_VISION_START,
    _left_pad,
    _qwen_sizes,
    build_vlm,
    llava_batch,
    llava_next_batch,
    select_samples,
    tiny_docowl_with_batch,
    tiny_internvl_with_batch,
    tiny_llava,
    tiny_llava_next,
    tiny_qwen2_5_vl,
    tiny_qwen2_vl,
)

LAYERS = 2
ATOL = 1e-5
ONE_AXIS = ("llava", "llava_next", "internvl", "mplug_docowl")  # families whose RoPE has one position axis
QWEN = ("qwen2_vl", "qwen2_5_vl")


# ---- the cases: a family, a batch, and where its vision tokens come from (written out by hand) --------------------

def _qwen_multi_image_batch(model, images_per_prompt=(2, 1, 2), seed=0) -> dict:
    """Left-padded Qwen batch with several images per prompt: BOS + text + (<vs> pads <ve> + text) per image."""
    from PIL import Image
    from transformers import Qwen2VLImageProcessorPil

    generator = torch.Generator().manual_seed(seed)
    sizes = [(48, 64), (32, 32), (60, 30), (64, 48), (50, 50)][:sum(images_per_prompt)]
    images = [Image.fromarray((torch.rand(h, w, 3, generator=generator) * 255).to(torch.uint8).numpy())
              for h, w in sizes]
    processed = Qwen2VLImageProcessorPil(**_qwen_sizes(model))(images=images, return_tensors="pt")
    counts = (processed["image_grid_thw"].prod(dim=-1) // model.config.vision_config.spatial_merge_size ** 2).tolist()
    rows, image = [], 0
    for count in images_per_prompt:
        row = [BOS_TOKEN] + torch.randint(3, 200, (2,), generator=generator).tolist()
        for _ in range(count):
            row += [QWEN_VISION_START] + [IMAGE_TOKEN] * counts[image] + [QWEN_VISION_END]
            row += torch.randint(3, 200, (3,), generator=generator).tolist()
            image += 1
        rows.append(row)
    batch = _left_pad(rows)
    batch["mm_token_type_ids"] = (batch["input_ids"] == IMAGE_TOKEN).long()
    return {**batch, "pixel_values": processed["pixel_values"], "image_grid_thw": processed["image_grid_thw"]}


@dataclass(frozen=True)
class Case:
    """A family and a batch for it. `panels(batch, row, positions)` -> (panels, structural): every panel of the row as
    a grid (list of rows of text-model positions) and the positions of vision tokens that cover no pixels."""

    name: str
    family: str
    build: Callable[[], tuple[torch.nn.Module, dict]] = field(compare=False)
    panels: Callable = field(compare=False)
    alone: Callable = field(default=select_samples, compare=False)


def _chunks(positions: list[int], size: int) -> list[list[int]]:
    assert len(positions) % size == 0
    return [positions[i:i + size] for i in range(0, len(positions), size)]


def _grid(flat: list[int], rows: int, cols: int) -> list[list[int]]:
    assert len(flat) == rows * cols
    return [flat[r * cols:(r + 1) * cols] for r in range(rows)]


def llava_panels(batch, row, positions):
    """LLaVA-1.5 (CLIP 32 px, patch 4): each image is 64 consecutive tokens, an 8 x 8 grid row-major."""
    return [_grid(chunk, 8, 8) for chunk in _chunks(positions, 64)], []


def llava_next_panels(batch, row, positions):
    """LLaVA-NeXT (CLIP 32 px, patch 8; images whose size is a grid pinpoint, so nothing is unpadded), each run of
    image tokens one image (image_sizes lists them over the batch in order): the base image's 4 x 4 tokens, then the
    crops as one (4·rows) x (4·cols) map row by row, each map row closed by a newline token; crop (R, C) of the map
    is panel 1 + R·cols + C."""
    panels, structural = [], []
    first = _images_before(batch, row)
    for index, run in enumerate(_runs(positions)):
        height, width = (int(v) for v in batch["image_sizes"][first + index])
        crop_rows, crop_cols = height // 32, width // 32
        base, rest = run[:16], run[16:]
        crops = [[[] for _ in range(4)] for _ in range(crop_rows * crop_cols)]
        line = 4 * crop_cols + 1
        assert len(rest) == 4 * crop_rows * line
        for big_row in range(4 * crop_rows):
            tokens = rest[big_row * line:(big_row + 1) * line]
            for big_col, position in enumerate(tokens[:-1]):
                crops[(big_row // 4) * crop_cols + big_col // 4][big_row % 4].append(position)
            structural.append(tokens[-1])
        panels += [_grid(base, 4, 4)] + crops
    return panels, structural


def internvl_panels(batch, row, positions):
    """InternVL (56 px tiles, patch 7, pixel shuffle 0.5): every tile is 16 consecutive context tokens, 4 x 4."""
    return [_grid(chunk, 4, 4) for chunk in _chunks(positions, 16)], []


def docowl_panels(batch, row, positions):
    """DocOwl stand-in (56 px crops, patch 7, 1x4 H-Reducer): every crop is 8 x 2 tokens then its vit_eos."""
    chunks = _chunks(positions, 17)
    return [_grid(chunk[:16], 8, 2) for chunk in chunks], [chunk[16] for chunk in chunks]


def qwen_panels(batch, row, positions):
    """Qwen2-VL / 2.5-VL (2 x 2 merge): each run of image pads is one image of (h/2) x (w/2) tokens row-major, its
    (t, h, w) the next row of image_grid_thw (images listed over the batch in order)."""
    first = _images_before(batch, row)
    runs = _runs(positions)
    panels = []
    for index, run in enumerate(runs):
        _, h, w = (int(v) for v in batch["image_grid_thw"][first + index])
        panels.append(_grid(run, h // 2, w // 2))
    return panels, []


def _runs(positions: list[int]) -> list[list[int]]:
    runs: list[list[int]] = []
    for position in positions:
        if runs and position == runs[-1][-1] + 1:
            runs[-1].append(position)
        else:
            runs.append([position])
    return runs


def _images_before(batch, row) -> int:
    """Images in the prompts before `row` (each run of image tokens is one image)."""
    ids = batch["input_ids"]
    starts = (ids == IMAGE_TOKEN) & (torch.nn.functional.pad(ids, (1, 0))[:, :-1] != IMAGE_TOKEN)
    return int(starts[:row].sum())


def _next_build():
    model = tiny_llava_next(layers=LAYERS)
    return model, llava_next_batch(model, image_sizes=((32, 64), (64, 32), (64, 64)))


def _next_multi_build():
    """LLaVA-NeXT, prompts of 2, 1 and 1 images (text between them), image sizes that are grid pinpoints."""
    from PIL import Image
    from transformers import LlavaNextImageProcessor

    model = tiny_llava_next(layers=LAYERS)
    generator = torch.Generator().manual_seed(0)
    sizes = ((32, 64), (64, 64), (64, 32), (32, 64))
    images = [Image.fromarray((torch.rand(h, w, 3, generator=generator) * 255).to(torch.uint8).numpy())
              for h, w in sizes]
    processed = LlavaNextImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                        image_grid_pinpoints=model.config.image_grid_pinpoints)(
        images=images, return_tensors="pt")
    tokens = [16 + 4 * (h // 32) * (4 * (w // 32) + 1) for h, w in sizes]  # base + crop rows with newlines
    rows, image = [], 0
    for count in (2, 1, 1):
        row = [BOS_TOKEN] + torch.randint(3, 200, (2,), generator=generator).tolist()
        for _ in range(count):
            row += [IMAGE_TOKEN] * tokens[image] + torch.randint(3, 200, (3,), generator=generator).tolist()
            image += 1
        rows.append(row)
    return model, {**_left_pad(rows), "pixel_values": processed["pixel_values"],
                   "image_sizes": processed["image_sizes"]}


def _next_alone(batch, row):
    """Prompt `row` of a LLaVA-NeXT batch alone and unpadded, with its own images."""
    keep = batch["attention_mask"][row].bool()
    first = _images_before(batch, row)
    count = _images_before(batch, row + 1) - first
    return {"input_ids": batch["input_ids"][row][keep][None],
            "attention_mask": batch["attention_mask"][row][keep][None],
            "pixel_values": batch["pixel_values"][first:first + count],
            "image_sizes": batch["image_sizes"][first:first + count]}


def _qwen_multi_build(builder):
    model = builder(layers=LAYERS)
    return model, _qwen_multi_image_batch(model)


CASES = [
    Case("llava-one-image", "llava", lambda: build_vlm("llava", "sdpa", LAYERS), llava_panels),
    Case("llava-two-images", "llava", lambda: (tiny_llava(layers=LAYERS), llava_batch(images_per_sample=2)),
         llava_panels),
    Case("llava_next-crops", "llava_next", _next_build, llava_next_panels),
    Case("llava_next-two-images", "llava_next", _next_multi_build, llava_next_panels, _next_alone),
    Case("internvl-tiles", "internvl", lambda: build_vlm("internvl", "sdpa", LAYERS), internvl_panels),
    Case("docowl-crops", "mplug_docowl", lambda: build_vlm("mplug_docowl", "sdpa", LAYERS), docowl_panels),
    Case("qwen2_vl-one-image", "qwen2_vl", lambda: build_vlm("qwen2_vl", "sdpa", LAYERS), qwen_panels),
    Case("qwen2_vl-two-images", "qwen2_vl", lambda: _qwen_multi_build(tiny_qwen2_vl), qwen_panels),
    Case("qwen2_5_vl-one-image", "qwen2_5_vl", lambda: build_vlm("qwen2_5_vl", "sdpa", LAYERS), qwen_panels),
    Case("qwen2_5_vl-two-images", "qwen2_5_vl", lambda: _qwen_multi_build(tiny_qwen2_5_vl), qwen_panels),
]
CASE_BY_NAME = {case.name: case for case in CASES}
METHODS = {"stride": Stride(keep_ratio=0.5), "pool": Pool(keep_ratio=0.25)}


def test_every_family_has_a_case():
    assert {case.family for case in CASES} == set(ADAPTERS)


@cache
def built(name: str):
    """(model, batch, stock text-model kwargs) of a case, built once per session."""
    model, batch = CASE_BY_NAME[name].build()
    return model, batch, text_inputs(model, call_inputs(model, batch))


def call_inputs(model, batch: dict) -> dict:
    """The batch, plus explicit position ids (real tokens counted, as generate() numbers them) where the family
    takes 2-D ones from the caller, so that a left-padded forward numbers each prompt from 0."""
    if model.config.model_type in ("llava", "llava_next", "internvl"):
        return {**batch, "position_ids": (batch["attention_mask"].cumsum(dim=1) - 1).clamp(min=0)}
    return dict(batch)


def text_inputs(model, inputs: dict) -> dict:
    """The keyword arguments the text model of the unwrapped model receives in a stock forward."""
    seen = {}
    handle = get_adapter(model).text_model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.update(kwargs), with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        handle.remove()
    return seen


def vision_positions(model, batch: dict, captured: dict) -> list[list[int]]:
    """Per row, the text-model positions of its vision features: the placeholders the family merges into (DocOwl:
    the features it expanded, marked by the modality indicators it hands the text model)."""
    mask = captured["attention_mask"].bool()
    if model.config.model_type == "mplug_docowl":
        vision = (captured["modality_indicators"] == 1) & mask
    else:
        vision = (batch["input_ids"] == IMAGE_TOKEN) & mask
    return [row.nonzero().flatten().tolist() for row in vision]


# ---- the plans, by hand ---------------------------------------------------------------------------------------

def stride_groups(panel: list[list[int]], ratio: float) -> list[list[int]]:
    """Stride: of a panel's p tokens (row-major) keep k = ⌈ratio·p⌉, the middle of each of k equal runs."""
    flat = [p for row in panel for p in row]
    keep = math.ceil(ratio * len(flat))
    return [[flat[int((j + 0.5) * len(flat) / keep)]] for j in range(keep)]


def pool_groups(panel: list[list[int]]) -> list[list[int]]:
    """Pool at 0.25 on even grids: 2 x 2 windows (a grid of 8 x 2 pools to 4 x 1 windows of 2 x 2 as well)."""
    rows, cols = len(panel), len(panel[0])
    assert rows % 2 == 0 and cols % 2 == 0
    return [[panel[r + i][c + j] for i in (0, 1) for j in (0, 1)] for r in range(0, rows, 2) for c in range(0, cols, 2)]


def hand_groups(case: Case, method: str, batch: dict, positions: list[list[int]]) -> list[list[list[int]]]:
    """Per row, the groups of vision positions that become one token each (a kept token and what is merged into
    it); every image is reduced, so its tokens that cover no pixels go."""
    out = []
    for row, row_positions in enumerate(positions):
        panels, _ = case.panels(batch, row, row_positions)
        groups = []
        for panel in panels:
            groups += stride_groups(panel, 0.5) if method == "stride" else pool_groups(panel)
        out.append(groups)
    return out


# ---- the reference --------------------------------------------------------------------------------------------

def qwen_rope_positions(ids: list[int], grids: list[tuple[int, int]]) -> torch.Tensor:
    """(3, L) Qwen2-VL's multi-axis positions of one unpadded prompt of images, by its published rule: a text token
    takes the next position on all three axes; an image of r x c tokens starting at s puts token (i, j) at
    (s, s + i, s + j), and the text after it continues from s + max(r, c)."""
    out, next_position, index, image = [], 0, 0, 0
    while index < len(ids):
        if ids[index] != IMAGE_TOKEN:
            out.append((next_position,) * 3)
            next_position += 1
            index += 1
            continue
        rows, cols = grids[image]
        out += [(next_position, next_position + i, next_position + j) for i in range(rows) for j in range(cols)]
        next_position += max(rows, cols)
        index += rows * cols
        image += 1
    return torch.tensor(out).T


def reference_last_logits(model, batch: dict, captured: dict, row: int, groups: list[list[int]],
                          packed: bool) -> torch.Tensor:
    """(V,) the logits at row `row`'s last prompt token, from the stock text model called directly with the reduced
    prompt built here: text tokens and, for each group, one token at its first position holding the group's mean
    embedding; no padding, mask all ones, positions written out."""
    family = model.config.model_type
    mask = captured["attention_mask"][row].bool()
    real = mask.nonzero().flatten().tolist()
    embeds = captured["inputs_embeds"][row]  # (T, D) the stock merge
    vision = set(vision_positions(model, batch, captured)[row])
    merged = {min(group): group for group in groups}
    sequence = [p for p in real if p not in vision or p in merged]
    inputs = torch.stack([embeds[merged[p]].mean(dim=0) if p in merged else embeds[p] for p in sequence])[None]
    length = len(sequence)
    if packed:
        position_ids = torch.arange(length)[None]
    elif family in QWEN:
        ids = batch["input_ids"][row][mask].tolist()
        panels, _ = qwen_panels(batch, row, sorted(vision))
        full = qwen_rope_positions(ids, [(len(panel), len(panel[0])) for panel in panels])  # (3, L_real)
        index = torch.tensor([real.index(p) for p in sequence])
        position_ids = full[:, index][:, None]  # (3, 1, L)
    else:
        position_ids = torch.tensor([real.index(p) for p in sequence])[None]  # real tokens before it
    extra = {}
    if family == "mplug_docowl":
        extra["modality_indicators"] = torch.tensor([[1 if p in merged else 0 for p in sequence]])
    adapter = get_adapter(model)
    with torch.no_grad():
        hidden = adapter.text_model(inputs_embeds=inputs, attention_mask=torch.ones(1, length, dtype=torch.long),
                                    position_ids=position_ids, **extra).last_hidden_state
        return model.get_output_embeddings()(hidden[0, -1])


# ---- prefill, padding and decode against the reference -------------------------------------------------------

CASE_METHODS = [pytest.param(case.name, method, id=f"{case.name}-{method}") for case in CASES for method in METHODS]


@pytest.mark.parametrize("name,method", CASE_METHODS)
def test_reduced_prefill_equals_the_text_model_on_hand_built_inputs(name, method):
    case = CASE_BY_NAME[name]
    model, batch, captured = built(name)
    positions = vision_positions(model, batch, captured)
    groups = hand_groups(case, method, batch, positions)
    with torch.no_grad(), mmreduce.wrap(model, METHODS[method]) as reduced:
        logits = reduced(**call_inputs(model, batch)).logits
        kept = reduced.stats.kept_positions[0]
    assert kept == [sorted(min(group) for group in row) for row in groups]
    for row in range(batch["input_ids"].shape[0]):
        reference = reference_last_logits(model, batch, captured, row, groups[row], packed=False)
        assert torch.allclose(logits[row, -1], reference, atol=ATOL, rtol=0), (row, (logits[row, -1] - reference))
    with torch.no_grad():
        stock = model(**call_inputs(model, batch)).logits[:, -1]
    assert (stock - logits[:, -1]).abs().max() > 1e-3  # the reduction changed the answer: nothing vacuous above


@pytest.mark.parametrize("name,method", CASE_METHODS)
def test_padded_batch_equals_each_sample_alone(name, method):
    model, batch, _ = built(name)
    with torch.no_grad(), mmreduce.wrap(model, METHODS[method]) as reduced:
        together = reduced(**call_inputs(model, batch)).logits[:, -1]
        for row in range(batch["input_ids"].shape[0]):
            alone = reduced(**call_inputs(model, CASE_BY_NAME[name].alone(batch, row))).logits[0, -1]
            assert torch.allclose(alone, together[row], atol=ATOL, rtol=0), (row, (alone - together[row]).abs().max())


@pytest.mark.parametrize("name,method", CASE_METHODS)
def test_greedy_generate_with_cache_equals_without(name, method):
    model, batch, _ = built(name)
    options = {"max_new_tokens": 4, "do_sample": False, "output_logits": True, "return_dict_in_generate": True}
    with torch.no_grad(), mmreduce.wrap(model, METHODS[method]) as reduced:
        cached = reduced.generate(**batch, **options)
        uncached = reduced.generate(**batch, **options, use_cache=False)
    assert torch.equal(cached.sequences, uncached.sequences)
    for step, (a, b) in enumerate(zip(cached.logits, uncached.logits)):
        assert torch.allclose(a, b, atol=ATOL, rtol=0), (step, (a - b).abs().max())


PACKED_CASES = [pytest.param(case.name, method, id=f"{case.name}-{method}")
                for case in CASES if case.family in ONE_AXIS for method in METHODS]


@pytest.mark.parametrize("name,method", PACKED_CASES)
def test_packed_positions_equal_a_reference_numbered_afresh(name, method):
    case = CASE_BY_NAME[name]
    model, batch, captured = built(name)
    groups = hand_groups(case, method, batch, vision_positions(model, batch, captured))
    options = {"max_new_tokens": 3, "do_sample": False, "output_logits": True, "return_dict_in_generate": True}
    with torch.no_grad(), mmreduce.wrap(model, METHODS[method], positions="packed") as reduced:
        logits = reduced(**call_inputs(model, batch)).logits
        cached = reduced.generate(**batch, **options)
        uncached = reduced.generate(**batch, **options, use_cache=False)
    for row in range(batch["input_ids"].shape[0]):
        reference = reference_last_logits(model, batch, captured, row, groups[row], packed=True)
        assert torch.allclose(logits[row, -1], reference, atol=ATOL, rtol=0), (row, (logits[row, -1] - reference))
        original = reference_last_logits(model, batch, captured, row, groups[row], packed=False)
        assert (original - reference).abs().max() > 1e-4  # packing really moved the positions
    assert torch.equal(cached.sequences, uncached.sequences)
    assert torch.allclose(cached.logits[0], logits[:, -1], atol=ATOL, rtol=0)
    for a, b in zip(cached.logits, uncached.logits):
        assert torch.allclose(a, b, atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", QWEN)
def test_packed_positions_are_refused_on_multi_axis_rope(family):
    name = f"{family}-one-image"
    model, batch, _ = built(name)
    with torch.no_grad():
        stock = model(**batch).logits
        refusal = pytest.raises(ValueError, match=r"positions='packed' is defined for one position axis.*"
                                                  r"use positions='original'")
        with mmreduce.wrap(model, Stride(keep_ratio=0.5), positions="packed") as reduced, refusal:
            reduced(**batch)
        assert torch.equal(model(**batch).logits, stock)  # nothing was left half-applied


FAMILY_CASES = ["llava-one-image", "llava_next-crops", "internvl-tiles", "docowl-crops", "qwen2_vl-one-image",
                "qwen2_5_vl-one-image"]


@pytest.mark.parametrize("name", FAMILY_CASES)
def test_beam_search_with_a_reduced_prompt(name):
    """Beams repeat each sample (and DocOwl its crops): cached equals cache-free, and the first sample's beams
    equal that sample alone."""
    model, batch, _ = built(name)
    beam = {"max_new_tokens": 3, "do_sample": False, "num_beams": 3, "num_return_sequences": 2}
    with torch.no_grad(), mmreduce.wrap(model, Pool(keep_ratio=0.25)) as reduced:
        cached = reduced.generate(**batch, **beam)
        uncached = reduced.generate(**batch, **beam, use_cache=False)
        first_alone = reduced.generate(**CASE_BY_NAME[name].alone(batch, 0), **beam)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached[:2, -3:], first_alone[:, -3:])


@pytest.mark.parametrize("name", FAMILY_CASES)
def test_compose_drops_inside_the_llm_from_the_tokens_the_before_stage_kept(name):
    """Stride before the LLM, then PyramidDrop at layer 1 of 2: the in-LLM stage starts from the tokens stride
    kept (counted by hand), keeps half of them, and the reduced generate is the same with and without a cache and
    for each sample alone."""
    model, batch, captured = built(name)
    groups = hand_groups(CASE_BY_NAME[name], "stride", batch, vision_positions(model, batch, captured))
    composed = Compose(Stride(keep_ratio=0.5), PyramidDrop.example(LAYERS))
    with torch.no_grad(), mmreduce.wrap(model, composed) as reduced:
        cached = reduced.generate(**batch, max_new_tokens=3, do_sample=False)
        counts = reduced.stats.vision_tokens_per_layer
        uncached = reduced.generate(**batch, max_new_tokens=3, do_sample=False, use_cache=False)
        alone = [reduced.generate(**CASE_BY_NAME[name].alone(batch, row), max_new_tokens=3, do_sample=False)
                 for row in range(batch["input_ids"].shape[0])]
    assert counts == [[len(row), math.ceil(len(row) / 2)] for row in groups]
    assert torch.equal(cached, uncached)
    for row, tokens in enumerate(alone):
        assert torch.equal(tokens[0, -3:], cached[row, -3:])


def test_hand_written_qwen_positions_are_the_stock_ones():
    """The multi-axis rule the reference uses gives the positions the stock model computes (several images)."""
    model, batch, captured = built("qwen2_vl-two-images")
    positions = vision_positions(model, batch, captured)
    for row in range(batch["input_ids"].shape[0]):
        mask = batch["attention_mask"][row].bool()
        panels, _ = qwen_panels(batch, row, positions[row])
        hand = qwen_rope_positions(batch["input_ids"][row][mask].tolist(),
                                   [(len(panel), len(panel[0])) for panel in panels])
        assert torch.equal(hand, captured["position_ids"][-3:, row][:, mask])


# ---- token layouts of whole batches ---------------------------------------------------------------------------

def test_internvl_batch_layout_needs_no_image_sizes():
    model, batch = tiny_internvl_with_batch(layers=1)  # 3, 1 and 5 tiles of 16 tokens; the stock inputs
    adapter = get_adapter(model)
    cells, grids = adapter.batch_token_layout(batch)
    assert len(cells) == int(adapter.count_vision_tokens(batch["input_ids"]).sum()) == 16 * 9
    tile = [(r, c) for r in range(4) for c in range(4)]
    expected = [TokenCell(0, panel, r, c) for panel in (1, 2, 0) for r, c in tile]
    expected += [TokenCell(1, 0, r, c) for r, c in tile]
    expected += [TokenCell(2, panel, r, c) for panel in (1, 2, 3, 4, 0) for r, c in tile]
    assert cells == expected
    assert [grid.crops for grid in grids] == [(0, 0)] * 3  # where a crop lies in the image is unknown
    # the panels' pixels: each image's crops then its thumbnail, images one after the other
    assert [[panel.index for panel in grid.panels] for grid in grids] == [
        [(2,), (0,), (1,)], [(3,)], [(8,), (4,), (5,), (6,), (7,)]]
    # with image_sizes (as the demo's inputs hold), the same cells and the processor's crop grids
    batch["image_sizes"] = torch.tensor([[56, 112], [56, 56], [112, 112]])
    cells, grids = adapter.batch_token_layout(batch)
    assert [grid.crops for grid in grids] == [(1, 2), (0, 0), (2, 2)] and cells == expected


def test_docowl_batch_layout_with_and_without_patch_positions():
    model, batch = tiny_docowl_with_batch(layers=1)  # pages of 3, 2 and 5 crops (global image first)
    adapter = get_adapter(model)
    cells, grids = adapter.batch_token_layout(batch)
    crop = [(r, c) for r in range(8) for c in range(2)]

    def page(image, panels):
        return [cell for panel in panels for cell in
                [TokenCell(image, panel, r, c) for r, c in crop] + [TokenCell(image, END_OF_PANEL, panel, -1)]]

    assert cells == page(0, [0, 1, 2]) + page(1, [0, 1]) + page(2, [0, 1, 2, 3, 4])
    assert [[panel.index for panel in grid.panels] for grid in grids] == [
        [(0,), (1,), (2,)], [(3,), (4,)], [(5,), (6,), (7,), (8,), (9,)]]
    # the processor's positions give the same panels (row-major crops) and the crop grids
    positions = [[9, 9], [0, 0], [0, 1], [9, 9], [0, 0], [9, 9], [0, 0], [0, 1], [1, 0], [1, 1]]
    with_positions, grids = adapter.batch_token_layout({**batch, "patch_positions": torch.tensor(positions)})
    assert with_positions == cells and [grid.crops for grid in grids] == [(1, 2), (1, 1), (2, 2)]


@pytest.mark.parametrize("name,images", [("qwen2_vl-two-images", 5), ("llava-two-images", 6),
                                         ("llava_next-two-images", 4)])
def test_batch_layout_is_each_prompts_layout_with_images_numbered_across_the_batch(name, images):
    model, batch, _ = built(name)
    adapter = get_adapter(model)
    cells, grids = adapter.batch_token_layout(batch)
    expected, seen = [], 0
    for row in range(batch["input_ids"].shape[0]):
        alone, alone_grids = adapter.batch_token_layout(CASE_BY_NAME[name].alone(batch, row))
        expected += [TokenCell(cell.image + seen, cell.panel, cell.row, cell.col) for cell in alone]
        seen += len(alone_grids)
    assert cells == expected and seen == len(grids) == images
    assert len(cells) == int(adapter.count_vision_tokens(batch["input_ids"]).sum())


# ---- vision-tower signals -------------------------------------------------------------------------------------

def _signal_model(family: str, qk_norm: bool = False):
    """A tiny model of `family` under eager attention, batch of two prompts; the tower's CLS token and position
    embeddings (zeros at init in InternVL and DocOwl) get random values so the CLS query attends unevenly."""
    if family == "llava":
        model, batch = tiny_llava("eager", layers=1), llava_batch(prompt_lengths=((3, 5), (1, 2)))
    elif family == "llava_next":
        model = tiny_llava_next("eager", layers=1)
        batch = llava_next_batch(model, image_sizes=((48, 64), (60, 30)), prompt_lengths=((3, 5), (1, 2)))
    elif family == "internvl":
        model, batch = tiny_internvl_with_batch("eager", layers=1, image_sizes=((56, 112), (56, 56)),
                                                prompt_lengths=((3, 5), (1, 2)))
    else:
        model, batch = tiny_docowl_with_batch("eager", layers=1, image_sizes=((56, 112), (56, 56)),
                                              prompt_lengths=((3, 5), (1, 2)))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for attention in get_adapter(model).vision_attention_modules():  # random init attends almost evenly
            for name in ("q_proj", "k_proj", "query_key_value"):
                if hasattr(attention, name):
                    getattr(attention, name).weight.mul_(6.0)
        embeddings = get_adapter(model).vision_tower.embeddings
        for name in ("cls_token", "position_embeddings", "position_embedding"):
            value = getattr(embeddings, name, None)
            if isinstance(value, torch.nn.Parameter):
                value.copy_(torch.randn(value.shape, generator=generator))
        if qk_norm:  # InternViT-6B's full-width RMSNorm on q and k (use_qk_norm), with uneven weights
            from transformers.models.internvl.modeling_internvl import InternVLVisionRMSNorm

            for attention in get_adapter(model).vision_attention_modules():
                for name in ("q_norm", "k_norm"):
                    norm = InternVLVisionRMSNorm(attention.embed_dim)
                    norm.weight.copy_(1.0 + 0.5 * torch.randn(norm.weight.shape, generator=generator))
                    setattr(attention, name, norm)
    return model, batch


SIGNAL_FAMILIES = [pytest.param(family, False, id=family) for family in ("llava", "llava_next", "internvl",
                                                                         "mplug_docowl")]
SIGNAL_FAMILIES.append(pytest.param("internvl", True, id="internvl-qk_norm"))


@cache
def signal_case(family: str, qk_norm: bool):
    """(model, batch, tower input, eager attention weights per tower layer (N, H, S, S))."""
    model, batch = _signal_model(family, qk_norm)
    adapter = get_adapter(model)
    tower = adapter.vision_tower
    seen = {}

    def record(module, args, kwargs):
        seen.setdefault("pixels", kwargs.get("pixel_values", args[0] if args else None))

    handle = tower.register_forward_pre_hook(record, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**batch)
    finally:
        handle.remove()
    weights: list = []
    with torch.no_grad():
        if family == "mplug_docowl":  # the stand-in's ViT returns no attentions: its attention modules do
            handles = [m.register_forward_hook(lambda module, args, output: weights.append(output[1]))
                       for m in adapter.vision_attention_modules()]
            try:
                tower(pixel_values=seen["pixels"])
            finally:
                for h in handles:
                    h.remove()
        else:
            weights = list(tower(pixel_values=seen["pixels"], output_attentions=True).attentions)
    assert all(w is not None for w in weights)
    return model, batch, seen["pixels"], weights


@pytest.mark.parametrize("family,qk_norm", SIGNAL_FAMILIES)
def test_probe_records_the_towers_own_eager_cls_attention(family, qk_norm):
    model, _, pixels, weights = signal_case(family, qk_norm)
    adapter = get_adapter(model)
    layers = len(weights)
    probe = TowerProbe(adapter, [SignalRequest("cls_attention", 0), SignalRequest("cls_attention", -1)])
    probe.install()
    try:
        with torch.no_grad():
            adapter.vision_tower(pixel_values=pixels)
    finally:
        probe.remove()
    for layer in (0, layers - 1):
        eager = weights[layer][:, :, 0, 1:].mean(dim=1)  # (N, P): the CLS query's row, patches only, mean of heads
        recorded = probe.signals[f"cls_attention@{layer}"]
        assert recorded.shape == eager.shape
        assert torch.allclose(recorded, eager, atol=1e-5, rtol=0), (layer, (recorded - eager).abs().max())
        assert eager.std(dim=1).min() > 1e-3  # uneven attention: the comparison is not between two uniform rows


class _Stop(Exception):
    pass


def _merged_vision_features(model, batch, perturb=None) -> torch.Tensor:
    """(n, D) the text model's input embeddings at its vision positions, rows of the batch one after the other, with
    `perturb` = (tower row, patch) moved at the output of the tower's last attention (so only that patch's
    features change); stops at the text model's door."""
    adapter = get_adapter(model)
    seen = {}

    def at_text_model(module, args, kwargs):
        seen.update(kwargs)
        raise _Stop

    def move(module, args, output):
        moved = output[0].clone()
        # a random direction: a constant shift of every channel would vanish in the LayerNorm that follows
        direction = torch.randn(moved.shape[-1], generator=torch.Generator().manual_seed(0))
        moved[perturb[0], 1 + perturb[1]] += 5.0 * direction
        return (moved, *output[1:])

    handles = [adapter.text_model.register_forward_pre_hook(at_text_model, with_kwargs=True)]
    if perturb is not None:
        handles.append(adapter.vision_attention_modules()[-1].register_forward_hook(move))
    try:
        with torch.no_grad():
            model(**batch)
    except _Stop:
        pass
    finally:
        for handle in handles:
            handle.remove()
    positions = vision_positions(model, batch, seen)
    return torch.cat([seen["inputs_embeds"][row, where] for row, where in enumerate(positions)])


@cache
def patch_coverage(family: str) -> torch.Tensor:
    """What the stock model says each vision token reads: (n_tokens, N, P) bool, token t covers patch p of tower row
    k when moving that patch changes t's embedding; with N tower rows of P patches."""
    model, batch, pixels, _ = signal_case(family, False)
    rows, patches = get_adapter(model).tower_patch_grid()
    base = _merged_vision_features(model, batch)
    coverage = torch.zeros(base.shape[0], pixels.shape[0], rows * patches, dtype=torch.bool)
    for tower_row in range(pixels.shape[0]):
        for patch in range(rows * patches):
            moved = _merged_vision_features(model, batch, (tower_row, patch))
            coverage[:, tower_row, patch] = (moved - base).abs().amax(dim=-1) > 1e-6
    return coverage


@pytest.mark.parametrize("family", ["llava", "llava_next", "internvl", "mplug_docowl"])
def test_token_signals_sum_exactly_the_patches_each_token_reads(family):
    model, batch, pixels, _ = signal_case(family, False)
    adapter = get_adapter(model)
    coverage = patch_coverage(family)  # (n, N, P)
    covered = coverage.flatten(1).sum(dim=1)
    expected_count = {"llava": 1, "llava_next": 1, "internvl": 4, "mplug_docowl": 4}[family]
    assert set(covered.tolist()) <= {0, expected_count} and (covered == expected_count).any()
    cells, grids = adapter.batch_token_layout(batch)
    assert [cell.panel < 0 for cell in cells] == (covered == 0).tolist()  # newline / eos tokens read no patch
    probe = TowerProbe(adapter, [SignalRequest("cls_attention", -1), SignalRequest("keys", -1)])
    layer = len(adapter.vision_attention_modules()) - 1
    generator = torch.Generator().manual_seed(0)
    attention = torch.rand(pixels.shape[0], coverage.shape[2], generator=generator)  # (N, P)
    keys = torch.randn(pixels.shape[0], coverage.shape[2], 3, generator=generator)  # (N, P, C)
    probe.signals = {f"cls_attention@{layer}": attention, f"keys@{layer}": keys}
    signals = token_signals(probe, adapter, cells, grids)
    weights = coverage.flatten(1).float()  # (n, N·P)
    expected_attention = weights @ attention.flatten()
    expected_keys = (weights @ keys.flatten(0, 1)) / weights.sum(dim=1, keepdim=True).clamp(min=1)
    assert torch.allclose(signals["cls_attention@-1"], expected_attention, atol=1e-6)
    assert torch.allclose(signals["keys@-1"], expected_keys, atol=1e-6)


@dataclass
class _SignalRecorder(BeforeLLMMethod):
    """Keeps every token and records the signals the engine hands it (one VisionTokens per row)."""

    name = "signal_recorder"
    requests: tuple = ()
    seen: list = field(default_factory=list)

    def signal_requests(self) -> list[SignalRequest]:
        return list(self.requests)

    def plan(self, tokens: VisionTokens) -> TokenPlan:
        self.seen.append(tokens)
        return TokenPlan.select(torch.ones(tokens.count, dtype=torch.bool))


@pytest.mark.parametrize("family", ["llava", "llava_next", "internvl", "mplug_docowl"])
def test_engine_hands_each_token_the_cls_attention_of_its_patches(family):
    """End to end: the per-token CLS attention a method receives is the tower's eager attention summed over the
    patches the token reads."""
    model, batch, _, weights = signal_case(family, False)
    recorder = _SignalRecorder(requests=(SignalRequest("cls_attention", -1),))
    with torch.no_grad(), mmreduce.wrap(model, recorder) as reduced:
        reduced(**batch)
    received = torch.cat([tokens.signals["cls_attention@-1"] for tokens in recorder.seen])
    eager = weights[-1][:, :, 0, 1:].mean(dim=1)  # (N, P)
    coverage = patch_coverage(family).flatten(1)  # (n, N·P)
    reads_pixels = coverage.any(dim=1)  # methods see the tokens that cover pixels, not newline / eos tokens
    expected = coverage[reads_pixels].float() @ eager.flatten()
    assert torch.allclose(received, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", QWEN)
@pytest.mark.parametrize("kind", ["cls_attention", "keys"])
def test_qwen_tower_signals_are_refused_with_the_reason(family, kind):
    model, _, _ = built(f"{family}-one-image")
    adapter = get_adapter(model)
    assert adapter.vision_has_cls is False and adapter.vision_attention_modules() is None
    recorder = _SignalRecorder(requests=(SignalRequest(kind, -1),))
    # either reason is the whole truth for CLS attention (no CLS token, and a tower the probe does not read)
    with pytest.raises(ValueError, match=rf"(which {kind} scoring needs|has no CLS token).*pool, stride or tome"):
        mmreduce.wrap(model, recorder)
    mmreduce.wrap(model, Stride()).unwrap()  # the refusal left no wrap behind
