"""AIM: PageRank importance, the retain schedule, the merge before the LLM, and both parts through `wrap`.

References are independent of the code under test: a numpy power iteration, the paper's schedule formula, merges
worked out by hand, the stock model, and the eager full-length masked reference (tests/support/masked_reference.py),
from whose attention weights the PageRank selection is re-derived (softmax(A/τ) = P^(1/τ) renormalised per row, P
the eager probabilities).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import mmreduce
from mmreduce.adapters import get_adapter
from mmreduce.adapters.base import TokenCell
from mmreduce.methods import DropStage, ScoreContext, VisionTokens
from mmreduce.methods.aim import (AIMMerge, pagerank_importance, prompt_attention_logits, retain_fraction,
                                  stream_queries_and_keys)
from tests.support.masked_reference import (assert_matches_reference, dropped_from_kept, masked_forward,
                                            vision_positions)
from tests.support.vlm_factory import IMAGE_TOKEN, llava_batch, tiny_llava

LAYERS = 6


@pytest.fixture(scope="module")
def llava():
    """A tiny LLaVA-1.5 (sdpa, 6 layers, GQA 4/2 heads) and its left-padded batch of three (64 vision tokens)."""
    return tiny_llava("sdpa", layers=LAYERS), llava_batch()


# ---- PageRank ----------------------------------------------------------------------------------------------

def numpy_pagerank(probabilities: np.ndarray, iterations: int) -> np.ndarray:
    """(H, n, n) row-stochastic matrices -> (n,) sqrt(mean_h dist²), dist = (1/n)·1 times M `iterations` times."""
    heads, count, _ = probabilities.shape
    importance = np.zeros(count)
    for head in range(heads):
        dist = np.full(count, 1.0 / count)
        for _ in range(iterations):
            dist = np.array([sum(dist[i] * probabilities[head, i, j] for i in range(count)) for j in range(count)])
        importance += dist ** 2
    return np.sqrt(importance / heads)


def test_pagerank_equals_a_numpy_power_iteration():
    logits = np.array([
        [[0.3, 0, 0, 0], [0.1, -0.2, 0, 0], [0.5, 0.4, -0.1, 0], [-0.3, 0.2, 0.6, 0.1]],
        [[1.0, 0, 0, 0], [0.0, 0.7, 0, 0], [-0.4, 0.1, 0.2, 0], [0.2, -0.1, 0.0, 0.5]],
    ])  # (H, n, n), row i = query i; entries above the diagonal are not keys (causal)
    tau, iterations = 0.1, 5
    causal = np.tril(np.ones((4, 4)))
    weights = np.exp(logits / tau) * causal
    expected = numpy_pagerank(weights / weights.sum(axis=-1, keepdims=True), iterations)
    masked = torch.tensor(logits, dtype=torch.float32).masked_fill(torch.tensor(causal) == 0, float("-inf"))
    got = pagerank_importance(masked, tau, iterations)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5)


def test_pagerank_by_hand_on_two_tokens():
    # One head, token 1 attends 0 and 1 with logits 0 and ln 3 · τ -> weights 1/4, 3/4; token 0 sees itself only.
    tau = 0.1
    logits = torch.tensor([[[0.0, float("-inf")], [0.0, math.log(3) * tau]]])
    # dist0 = (1/2, 1/2) -> dist1 = (1/2 + 1/8, 3/8); importance = sqrt(dist²) = dist for one head.
    assert torch.allclose(pagerank_importance(logits, tau, 1), torch.tensor([0.625, 0.375]))
    # dist2 = (5/8 + 3/32, 9/32)
    assert torch.allclose(pagerank_importance(logits, tau, 2), torch.tensor([23 / 32, 9 / 32]))


def test_prompt_logits_are_the_layers_eager_attention(llava):
    """The full (H, n, n) logits recomputed from the layer's input give, under softmax, the eager weights the
    model returns for every query of every sample (GQA, RoPE, left padding)."""
    model, batch = llava
    layer_idx = 3
    _, eager = masked_forward(model, batch, {}, capture_layer=layer_idx)  # (B, H, T, T)
    seen = {}

    def grab(module, args, kwargs):
        seen.update(hidden=args[0] if args else kwargs["hidden_states"], kwargs=dict(kwargs))

    layer = model.model.language_model.layers[layer_idx]
    handle = layer.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**batch)
    finally:
        handle.remove()
    mask = batch["attention_mask"].bool()
    batch_size, length = mask.shape
    context = ScoreContext(
        layer_idx=layer_idx, layer=layer, hidden=seen["hidden"], vision=vision_positions(batch, IMAGE_TOKEN),
        key_valid=mask, query_index=torch.full((batch_size,), length - 1),
        position_embeddings=seen["kwargs"]["position_embeddings"],
        original_index=torch.arange(length).expand(batch_size, -1),
        relative_position=torch.arange(length) - (~mask).sum(dim=1, keepdim=True), sample_seed=torch.zeros(batch_size),
        adapter=get_adapter(model), layer_kwargs=seen["kwargs"],
    )
    with torch.no_grad():
        query, key = stream_queries_and_keys(context, mask)
    start = 0
    for row in range(batch_size):
        count = int(mask[row].sum())
        logits = prompt_attention_logits(query[start:start + count].transpose(0, 1),
                                         key[start:start + count].transpose(0, 1), layer.self_attn.scaling)
        start += count
        real = mask[row].nonzero().flatten()
        reference = eager[row][:, real][:, :, real]  # (H, n, n)
        assert torch.allclose(logits.softmax(dim=-1), reference, atol=1e-6)


# ---- the schedule --------------------------------------------------------------------------------------------

def test_retain_schedule_is_the_papers_formula():
    for start, step in ((14, 0.125), (13, 0.125), (3, 0.2)):
        for layer in range(32):
            expected = 1.0 if layer < start else max(0.0, 1 - (layer - start + 1) * step)
            assert retain_fraction(layer, start, step) == pytest.approx(expected)


def test_stages_of_qwen2_7b_setting():
    """l1 = 14, step 1/8 on 28 layers: ranked by layer 14, its tokens keep 7/8 from layer 15 on, ..., none after layer
    21; each stage ranks at the layer where the previous one applies."""
    stages = mmreduce.AIM(start_layer=14, step=0.125).check_stages(28)
    expected = [(15, 0.875), (16, 0.75), (17, 0.625), (18, 0.5), (19, 0.375), (20, 0.25), (21, 0.125), (22, 0.0)]
    assert stages == [DropStage(score_layer=layer - 1, apply_layer=layer, fraction=f) for layer, f in expected]
    # LLaVA-1.5 (Vicuna) setting: 576 tokens merged to 72 (3 rounds), then pruned from after layer 13 on 32 layers.
    counts = mmreduce.AIM(merge_ratio=0.125, start_layer=13, step=0.125).planned_counts(32, 576)
    assert counts == [72] * 14 + [63, 54, 45, 36, 27, 18, 9] + [0] * 11


def test_schedule_stops_at_the_last_layer():
    stages = mmreduce.AIM(start_layer=5, step=0.125).check_stages(8)  # layers 5, 6 prune; layer 7 has no successor
    assert [(s.apply_layer, s.fraction) for s in stages] == [(6, 0.875), (7, 0.75)]


@pytest.mark.parametrize("kwargs, field", [
    (dict(merge_ratio=0.0), "merge_ratio"), (dict(merge_ratio=1.5), "merge_ratio"),
    (dict(start_layer=-1), "start_layer"), (dict(start_layer=2.0), "start_layer"),
    (dict(step=-0.1), "step"), (dict(step=2), "step"), (dict(tau=0), "tau"),
    (dict(tau=float("nan")), "tau"), (dict(iterations=0), "iterations"), (dict(iterations=True), "iterations"),
    (dict(frame_similarity=0.0), "frame_similarity"),
])
def test_bad_fields_are_refused_by_name(kwargs, field):
    with pytest.raises(ValueError, match=f"AIM.{field}"):
        mmreduce.AIM(**kwargs)


def test_start_layer_beyond_the_model_is_refused():
    with pytest.raises(ValueError, match="AIM.start_layer 7 leaves no layer to prune in a model with 8 decoder"):
        mmreduce.AIM(start_layer=7).check_stages(8)


# ---- the merge before the LLM ------------------------------------------------------------------------------

def _cells(image: int, panel: int, rows: int, cols: int) -> list[TokenCell]:
    return [TokenCell(image, panel, r, c) for r in range(rows) for c in range(cols)]


def test_merge_rounds_by_hand():
    """Five tokens of one panel, kept 2 (ratio 0.4): round 1 merges 2 of the A tokens {0, 2, 4}, round 2 one of 3.

    Round 1: A = 0, 2, 4; B = 1, 3. Tokens 0 and 4 equal token 1 (cosine 1), token 2 is at cosine 0.89 with it:
    0 and 4 merge into 1 (= e0). Round 2: A = 1, 3; B = 2: 1 (cosine 0.89 with 2) merges into 2, 3 (orthogonal) stays.
    The paper averages the current tokens unweighted: token 2 ends as (e0 + (e0 + e1/2)) / 2, so the original tokens
    0, 1, 4 weigh 1/6 each and token 2 weighs 1/2.
    """
    e = torch.eye(4)
    features = torch.stack([e[0], e[0], e[0] + 0.5 * e[1], e[2], e[0]])
    plan = AIMMerge(merge_ratio=0.4).plan(VisionTokens(features, _cells(0, 0, 1, 5)))
    assert plan.keep.tolist() == [False, False, True, True, False]  # kept tokens stay where they were, in order
    assert plan.target.tolist() == [2, 2, 2, 3, 2]
    weights = plan.merge_weights()
    by_hand = torch.tensor([[1 / 6, 1 / 6, 1 / 2, 0, 1 / 6], [0, 0, 0, 1, 0]], dtype=torch.float64)
    assert torch.allclose(weights, by_hand)
    assert torch.allclose(plan.apply(features), torch.stack([e[0] + 0.25 * e[1], e[2]]))


def test_merge_keeps_order_weights_and_panels():
    """Two panels (a base image and a crop, 4 x 4 each) of random features at 0.25: each keeps 4 of its own 16,
    merges never cross panels, every kept token stays at its position and its weights sum to one."""
    generator = torch.Generator().manual_seed(0)
    cells = _cells(0, 0, 4, 4) + _cells(0, 1, 4, 4)
    features = torch.randn(32, 8, generator=generator)
    plan = AIMMerge(merge_ratio=0.25).plan(VisionTokens(features, cells))
    plan.check(32)
    kept = plan.keep.nonzero().flatten()
    assert (kept < 16).sum() == 4 and (kept >= 16).sum() == 4
    assert all(cells[int(plan.target[i])].panel == cells[i].panel for i in range(32))
    assert torch.equal(plan.target[kept], kept)  # each kept token is its own target, at its own position
    weights = plan.merge_weights()  # (8, 32): row j = how the j-th kept token averages the 32
    assert torch.allclose(weights.sum(dim=1), torch.ones(8, dtype=torch.float64))
    by_hand = torch.stack([(weights[j, :, None] * features.double()).sum(dim=0) for j in range(8)]).float()
    assert torch.allclose(plan.apply(features), by_hand, atol=1e-6)


def test_merge_across_frames_by_hand():
    """Three frames (images) of a 2 x 2 grid, merge_ratio 1 (no merge inside a frame): the top-left cell is the same
    in every frame (one chain, 1/3 each), the top-right in frames 0 and 1 only (frame 2's is at cosine 0.32); the
    rest differ. Frame 2's bottom-left equals frame 0's but not frame 1's, so it stays: only consecutive frames are
    compared."""
    e = torch.eye(12)
    frames = [[e[0], e[1], e[2], e[3]], [e[0], e[1], e[4], e[5]], [e[0], e[1] + 3 * e[6], e[2], e[8]]]
    features = torch.stack([f for frame in frames for f in frame])
    cells = _cells(0, 0, 2, 2) + _cells(1, 0, 2, 2) + _cells(2, 0, 2, 2)
    plan = AIMMerge(merge_ratio=1.0, frame_similarity=0.99).plan(VisionTokens(features, cells))
    assert plan.keep.nonzero().flatten().tolist() == [0, 1, 2, 3, 6, 7, 9, 10, 11]
    assert plan.target.tolist() == [0, 1, 2, 3, 0, 1, 6, 7, 0, 9, 10, 11]
    merged = plan.apply(features)
    assert torch.allclose(merged[0], e[0]) and torch.allclose(merged[1], e[1])
    weights = plan.merge_weights()
    assert torch.allclose(weights[0, [0, 4, 8]], torch.full((3,), 1 / 3, dtype=torch.float64))
    assert torch.allclose(weights[1, [1, 5]], torch.full((2,), 1 / 2, dtype=torch.float64))
    # Without frame_similarity the frames are left alone.
    assert bool(AIMMerge(merge_ratio=1.0).plan(VisionTokens(features, cells)).keep.all())


# ---- through wrap --------------------------------------------------------------------------------------------

def test_keep_all_is_bit_identical(llava):
    model, batch = llava
    with torch.no_grad():
        stock_logits = model(**batch).logits
        stock_tokens = model.generate(**batch, max_new_tokens=4, do_sample=False)
        # Pruning with step 0, then the merge part run with nothing to merge (one image per sample: no frames).
        for method in (mmreduce.AIM(merge_ratio=1.0, start_layer=1, step=0.0),
                       mmreduce.AIM(merge_ratio=1.0, start_layer=1, step=0.0, frame_similarity=0.5)):
            with mmreduce.wrap(model, method) as reduced:
                assert torch.equal(reduced(**batch).logits, stock_logits)
                assert torch.equal(reduced.generate(**batch, max_new_tokens=4, do_sample=False), stock_tokens)
                assert not reduced.stats.reduced


def reference_pagerank_selection(model, batch, method: mmreduce.AIM) -> dict[int, list[list[int]]]:
    """Each stage's kept vision positions, re-derived from the eager weights of the masked reference: PageRank on
    the sample's surviving tokens, M = P^(1/τ) renormalised, ranks ties toward the earlier position."""
    mask = batch["attention_mask"].bool()
    vision = vision_positions(batch, IMAGE_TOKEN)
    initial = vision.sum(dim=1)
    dropped = torch.zeros_like(vision)
    dropped_from, kept_positions = {}, {}
    for stage in method.check_stages(LAYERS):
        _, weights = masked_forward(model, batch, dict(dropped_from), capture_layer=stage.score_layer)
        rows = []
        for row in range(mask.shape[0]):
            alive = (mask[row] & ~dropped[row]).nonzero().flatten()  # (n,)
            probabilities = weights[row][:, alive][:, :, alive].double().numpy()  # (H, n, n)
            sharpened = probabilities ** (1 / method.tau)
            importance = numpy_pagerank(sharpened / sharpened.sum(axis=-1, keepdims=True), method.iterations)
            candidates = [(float(importance[i]), int(p)) for i, p in enumerate(alive.tolist()) if vision[row, p]]
            keep = min(len(candidates), math.ceil(stage.fraction * int(initial[row]) - 1e-9))
            chosen = sorted(p for _, p in sorted(candidates, key=lambda c: (-c[0], c[1]))[:keep])
            dropped[row, [p for _, p in candidates if p not in chosen]] = True
            rows.append(chosen)
        dropped_from[stage.apply_layer] = dropped.clone()
        kept_positions[stage.apply_layer] = rows
    return kept_positions


def test_pruning_matches_the_masked_reference(llava):
    """AIM without merge: the engine's selection equals PageRank re-derived from eager weights, the reduced logits
    and every generated step equal the full-length masked reference on that selection, cached or not."""
    model, batch = llava
    method = mmreduce.AIM(merge_ratio=1.0, start_layer=1, step=0.3)  # keeps 0.7, 0.4, 0.1 from layers 2, 3, 4
    steps = 4
    with torch.no_grad(), mmreduce.wrap(model, method) as reduced:
        logits = reduced(**batch).logits
        kept = reduced.stats.kept_positions
        counts = reduced.stats.vision_tokens_per_layer
        cached = reduced.generate(**batch, max_new_tokens=steps, do_sample=False, output_logits=True,
                                  return_dict_in_generate=True)
        uncached = reduced.generate(**batch, max_new_tokens=steps, do_sample=False, output_logits=True,
                                    return_dict_in_generate=True, use_cache=False)
    assert counts == [method.planned_counts(LAYERS, 64)] * 3 == [[64, 64, 45, 26, 7, 0]] * 3
    assert kept == reference_pagerank_selection(model, batch, method)

    dropped_from = dropped_from_kept(batch, kept, IMAGE_TOKEN)
    assert_matches_reference(model, batch, logits, (cached, uncached), dropped_from, batch["attention_mask"].bool(),
                             steps)


def test_merge_then_prune_runs_as_planned(llava):
    """Merge to 25% then prune: counts per layer as planned, cached = cache-free generate, and a clip of two
    identical frames (images) with frame_similarity collapses to one frame's tokens."""
    model, batch = llava
    method = mmreduce.AIM(merge_ratio=0.25, start_layer=2, step=0.25)
    with torch.no_grad(), mmreduce.wrap(model, method) as reduced:
        cached = reduced.generate(**batch, max_new_tokens=4, do_sample=False)
        assert reduced.stats.vision_tokens_per_layer == [method.planned_counts(LAYERS, 64)] * 3 \
            == [[16, 16, 16, 12, 8, 4]] * 3
        assert all(row == sorted(row) for row in reduced.stats.kept_positions[0])
        uncached = reduced.generate(**batch, max_new_tokens=4, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)

    clip = llava_batch(images_per_sample=2)
    clip["pixel_values"][1::2] = clip["pixel_values"][0::2]  # the second frame repeats the first
    video = mmreduce.AIM(merge_ratio=0.25, start_layer=2, step=0.25, frame_similarity=0.99)
    with torch.no_grad(), mmreduce.wrap(model, video) as reduced:
        reduced(**clip)
        assert [row[0] for row in reduced.stats.vision_tokens_per_layer] == [16] * 3
