"""VisionZip and ToMe before the LLM: their definitions against hand computations and plain-loop references, and
what the text model receives through `mmreduce.wrap` on tiny LLaVA-1.5 and LLaVA-NeXT models."""

from __future__ import annotations

import pytest
import torch

import mmreduce
from mmreduce.adapters import get_adapter
from mmreduce.adapters.base import NEWLINE, TokenCell
from mmreduce.methods.before import VisionTokens, keep_count
from mmreduce.methods.tome import ToMe, bipartite_merge_plan, merge_rounds, merged_sizes
from mmreduce.methods.visionzip import VisionZip, contextual_count, visionzip_plan
from tests.support.vlm_factory import IMAGE_TOKEN, build_vlm, llava_batch, tiny_llava

LAYERS = 6


# ---- independent references ---------------------------------------------------------------------------------

def reference_tome(features: torch.Tensor, groups: list[list[int]], budgets: list[int]) -> dict[int, torch.Tensor]:
    """ToMe with plain Python loops, in float64: per group, rounds of alternate A/B split, each A's most cosine-
    similar B (first of equal maxima), the min(p - budget, p // 2) strongest edges (earlier A on ties) merged by
    size-weighted averages. Returns {position of each surviving token (its B token's): merged feature}."""
    out = {}
    for members, budget in zip(groups, budgets):
        tokens = [(pos, features[pos].double(), 1.0) for pos in members]  # (position, value, size)
        while len(tokens) > budget and len(tokens) // 2 > 0:
            merges = min(len(tokens) - budget, len(tokens) // 2)
            side_a, side_b = tokens[0::2], tokens[1::2]
            edges = []
            for i, (_, value_a, _) in enumerate(side_a):
                cosines = [float(torch.dot(value_a, vb) / (value_a.norm() * vb.norm())) for _, vb, _ in side_b]
                best = max(range(len(side_b)), key=lambda j: (cosines[j], -j))
                edges.append((cosines[best], i, best))
            edges.sort(key=lambda edge: (-edge[0], edge[1]))
            side_b = list(side_b)
            merged_a = set()
            for _, i, j in edges[:merges]:
                pos_b, value_b, size_b = side_b[j]
                _, value_a, size_a = side_a[i]
                side_b[j] = (pos_b, (value_b * size_b + value_a * size_a) / (size_b + size_a), size_b + size_a)
                merged_a.add(i)
            tokens = sorted([t for i, t in enumerate(side_a) if i not in merged_a] + side_b, key=lambda t: t[0])
        out.update({pos: value for pos, value, _ in tokens})
    return out


def reference_visionzip(features, attention, keys, kept: int, contextual: int) -> dict[int, torch.Tensor]:
    """The paper's rule on one image, written out: dominant = top-(kept - contextual) CLS attention; contextual
    targets = every (R // contextual)-th remaining token from the first; every other remaining token goes to the
    target of highest key cosine; the paper's contextual token is target + mean(assigned), which the plan's
    normalised weights give halved. Returns {position: feature as it should enter the LLM}."""
    dominant = torch.topk(attention.double(), kept - contextual).indices.tolist()
    out = {pos: features[pos].double() for pos in dominant}
    remaining = [pos for pos in range(features.shape[0]) if pos not in dominant]
    step = max(1, len(remaining) // contextual)
    targets = remaining[::step][:contextual]
    assigned = {t: [] for t in targets}
    for pos in remaining:
        if pos in targets:
            continue
        cosines = [float(torch.cosine_similarity(keys[pos].double(), keys[t].double(), dim=0)) for t in targets]
        assigned[targets[cosines.index(max(cosines))]].append(pos)
    for t, members in assigned.items():
        paper = features[t].double() + (torch.stack([features[m].double() for m in members]).mean(0)
                                        if members else 0.0)
        out[t] = paper / 2 if members else paper
    return out


def text_model_inputs(model, method, batch) -> tuple[torch.Tensor, torch.Tensor, mmreduce.ReductionStats]:
    """(B, T', D) inputs_embeds and (B, T') mask the text model received in one wrapped forward, and the stats."""
    seen = {}

    def record(module, args, kwargs):
        seen["embeds"], seen["mask"] = kwargs["inputs_embeds"], kwargs["attention_mask"]

    with torch.no_grad(), mmreduce.wrap(model, method) as reduced:
        handle = get_adapter(model).text_model.register_forward_pre_hook(record, with_kwargs=True)
        try:
            reduced(**batch)
        finally:
            handle.remove()
        stats = reduced.stats
    return seen["embeds"], seen["mask"], stats


def llava_prompt_embeds(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """The stock (B, T, D) text-model inputs of a LLaVA-1.5 batch, and the (N, 64, D) image features in them."""
    with torch.no_grad():
        out = model.model.get_image_features(pixel_values=batch["pixel_values"], vision_feature_layer=-1,
                                             vision_feature_select_strategy="default")
        features = getattr(out, "pooler_output", out)
        features = torch.stack(list(features)) if isinstance(features, (list, tuple)) else features
        embeds = model.get_input_embeddings()(batch["input_ids"])
        embeds[batch["input_ids"] == IMAGE_TOKEN] = features.reshape(-1, features.shape[-1])
    return embeds, features


def expected_rows(batch, embeds, merged_per_row: list[dict[int, torch.Tensor]]) -> list[torch.Tensor]:
    """Per row, the real tokens in prompt order: text as is, vision tokens only where kept, with their features."""
    rows = []
    for row, merged in enumerate(merged_per_row):
        vision = (batch["input_ids"][row] == IMAGE_TOKEN).nonzero().flatten().tolist()
        slot = {pos: i for i, pos in enumerate(vision)}
        out = []
        for pos in batch["attention_mask"][row].nonzero().flatten().tolist():
            if pos not in slot:
                out.append(embeds[row, pos].double())
            elif slot[pos] in merged:
                out.append(merged[slot[pos]])
        rows.append(torch.stack(out))
    return rows


@pytest.fixture(scope="module")
def eager_llava():
    """A tiny LLaVA-1.5 whose CLIP tower runs eager attention, so it can return its attention weights."""
    return tiny_llava("eager", layers=LAYERS), llava_batch()


# ---- bipartite matching and merge plans ------------------------------------------------------------------------

def test_bipartite_pairs_on_hand_made_features():
    # A = 0, 2, 4 and B = 1, 3, 5. Edges (best B by cosine): 0 -> 3 (0.196; 0 with B 1), 2 -> 3 (0.614),
    # 4 -> 5 (0.999): with r = 2 the two strongest, 4 and 2, merge.
    features = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.5], [0.2, 1.0], [-1.0, 0.0], [-1.0, 0.05]])
    plan = bipartite_merge_plan(features, torch.ones(6), 2)
    assert plan.keep.tolist() == [True, True, False, True, False, True]
    assert plan.target.tolist() == [0, 1, 3, 3, 5, 5]
    assert merged_sizes(plan).tolist() == [1.0, 1.0, 2.0, 2.0]
    # r = 3: token 0 merges too, into B 3; with token 2 already standing for two tokens, sizes add: 1 + 2 + 1.
    plan = bipartite_merge_plan(features, torch.tensor([1.0, 1.0, 2.0, 1.0, 1.0, 1.0]), 3)
    assert plan.target.tolist() == [3, 1, 3, 3, 5, 5]
    assert merged_sizes(plan).tolist() == [1.0, 4.0, 2.0]
    weights = plan.merge_weights()  # size-weighted: token 2 (size 2) counts twice in B 3's average
    assert weights[1].tolist() == [0.25, 0, 0.5, 0.25, 0, 0]


def test_groups_never_merge_across_panels_and_budgets_per_group():
    # Token 0 equals token 5, but 5 is in another group; within its group 0's only B token is 1.
    features = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [0.6, 0.8], [1.0, 0.1], [1.0, 0.0]])
    groups = [[0, 1, 2, 3], [4, 5]]
    plan = bipartite_merge_plan(features, torch.ones(6), 3, groups)
    assert plan.target.tolist() == [3, 1, 1, 3, 5, 5]  # 0 -> 3 (cos .6 > 0), 2 -> 1 (cos 1), 4 -> 5 (inside)
    plan = bipartite_merge_plan(features, torch.ones(6), [1, 0], groups)
    assert plan.target.tolist() == [0, 1, 1, 3, 4, 5]
    with pytest.raises(ValueError, match="only 3 A tokens"):
        bipartite_merge_plan(features, torch.ones(6), 4, groups)
    with pytest.raises(ValueError, match="one count per group"):
        bipartite_merge_plan(features, torch.ones(6), [1], groups)


def test_tome_rounds_equal_a_plain_loop_reference():
    generator = torch.Generator().manual_seed(3)
    features = torch.randn(40, 8, generator=generator)
    groups = [list(range(25)), list(range(25, 40))]
    budgets = [keep_count(0.2, 25), keep_count(0.2, 15)]  # 5 and 3
    plan, rounds = merge_rounds(features, groups, budgets)
    reference = reference_tome(features, groups, budgets)
    kept = plan.keep.nonzero().flatten().tolist()
    assert kept == sorted(reference)  # the same survivors, each at its B token's position, prompt order
    assert torch.allclose(plan.apply(features).double(), torch.stack([reference[p] for p in kept]), atol=1e-5)
    assert rounds == 3  # 25 -> 13 -> 7 -> 5 and 15 -> 8 -> 4 -> 3: never more than half per round
    weights = plan.merge_weights()
    assert torch.allclose(weights.sum(dim=1), torch.ones(len(kept), dtype=torch.float64))
    assert (weights > 0).sum().item() == 40  # every token lands in exactly one kept token: sizes conserved
    for row, members in enumerate((weights > 0).tolist()):
        inside = [i for i, on in enumerate(members) if on]
        assert {0 if i < 25 else 1 for i in inside} == {0 if kept[row] < 25 else 1}  # one panel per token


def test_tome_merges_at_most_half_per_round():
    _, rounds = merge_rounds(torch.randn(64, 4), [list(range(64))], [1])
    assert rounds == 6  # 64 -> 32 -> 16 -> 8 -> 4 -> 2 -> 1


def synthetic_tokens(seed: int = 0) -> VisionTokens:
    """Two images: a 4 x 4 base panel with 2 rows of newline tokens, and a 3 x 3 image; random signals."""
    generator = torch.Generator().manual_seed(seed)
    cells = [TokenCell(0, 0, r, c) for r in range(4) for c in range(4)] + [TokenCell(0, NEWLINE, 0, -1)] * 2
    cells += [TokenCell(1, 0, r, c) for r in range(3) for c in range(3)]
    count = len(cells)
    signals = {"cls_attention@-2": torch.rand(count, generator=generator),
               "keys@-2": torch.randn(count, 4, generator=generator)}
    return VisionTokens(torch.randn(count, 6, generator=generator), cells, signals)


@pytest.mark.parametrize("method", [ToMe(keep_ratio=0.3), ToMe(keep_ratio=0.3, metric="keys"),
                                    VisionZip(keep_ratio=0.5, contextual_share=0.5)])
def test_plans_are_normalised_conserve_tokens_and_keep_prompt_order(method):
    tokens = synthetic_tokens()
    plan = method.plan_sample(tokens)
    weights = plan.merge_weights()  # (k, n)
    assert torch.allclose(weights.sum(dim=1), torch.ones(weights.shape[0], dtype=torch.float64))
    kept = plan.keep.nonzero().flatten().tolist()
    assert kept == sorted(kept) and all(int(plan.target[k]) == k for k in kept)
    # every image keeps ⌈r·p⌉ of its pixel tokens; the newline rows go with the merged image
    assert int(plan.keep[:16].sum()) == keep_count(method.keep_ratio, 16)
    assert int(plan.keep[18:].sum()) == keep_count(method.keep_ratio, 9)
    assert not plan.keep[16:18].any()
    if isinstance(method, ToMe):  # a merge, not a drop: each pixel token ends in a kept token of its own image
        assert (weights > 0).sum(dim=0)[[i for i in range(27) if i not in (16, 17)]].tolist() == [1] * 25
        assert all(tokens.cells[int(t)].image == tokens.cells[i].image for i, t in enumerate(plan.target) if t >= 0)


# ---- VisionZip -------------------------------------------------------------------------------------------------

def test_contextual_counts_are_the_papers():
    assert [contextual_count(k, 10 / 64) for k in (64, 128, 192)] == [10, 20, 30]  # 54+10, 108+20, 162+30
    assert contextual_count(1, 0.9) == 0  # at least one dominant token
    assert VisionZip(keep_ratio=64 / 576).kept_tokens(576) == 64


def test_contextual_merge_is_the_papers_rule_by_hand():
    # 8 tokens; CLS attention picks 1, 4, 6 as dominant; remaining 0, 2, 3, 5, 7 (R = 5), contextual 2: stride
    # 5 // 2 = 2 -> targets 0 and 3; keys send 2 and 7 to target 0, 5 to target 3.
    attention = torch.tensor([0.01, 0.30, 0.02, 0.03, 0.20, 0.04, 0.25, 0.05])
    keys = torch.tensor([[1.0, 0.0], [0, 0], [0.9, 0.1], [0.0, 1.0], [0, 0], [0.2, 0.9], [0, 0], [1.0, -0.3]])
    features = torch.arange(16, dtype=torch.float32).view(8, 2) ** 2
    plan = visionzip_plan(attention, keys, dominant=3, contextual=2)
    assert plan.keep.nonzero().flatten().tolist() == [0, 1, 3, 4, 6]
    out = plan.apply(features)
    paper_target_0 = features[0] + (features[2] + features[7]) / 2  # target + mean(assigned)
    paper_target_3 = features[3] + features[5]
    assert torch.allclose(out[0] * 2, paper_target_0) and torch.allclose(out[2] * 2, paper_target_3)
    assert torch.equal(out[[1, 3, 4]], features[[1, 4, 6]])  # dominant tokens unchanged
    # the plain reference reads the same rule
    reference = reference_visionzip(features, attention, keys, kept=5, contextual=2)
    assert torch.allclose(out.double(), torch.stack([reference[p] for p in (0, 1, 3, 4, 6)]))


def tower_signals(model, pixel_values):
    """(N, 64) CLS attention summed over heads and (N, 64, hd) keys averaged over heads at CLIP layer -2, from the
    eager tower's own attention weights and hidden states."""
    tower = model.model.vision_tower
    layer = len(tower.vision_model.encoder.layers) - 2 if hasattr(tower, "vision_model") \
        else len(tower.encoder.layers) - 2
    encoder = tower.vision_model.encoder if hasattr(tower, "vision_model") else tower.encoder
    with torch.no_grad():
        out = tower(pixel_values, output_attentions=True, output_hidden_states=True)
        attention = out.attentions[layer][:, :, 0, 1:].sum(dim=1)  # (N, 64)
        block = encoder.layers[layer]
        keys = block.self_attn.k_proj(block.layer_norm1(out.hidden_states[layer]))  # (N, S, H*hd)
        heads = model.config.vision_config.num_attention_heads
        keys = keys.view(*keys.shape[:2], heads, -1).mean(dim=2)[:, 1:]  # (N, 64, hd)
    return attention, keys


def test_dominant_tokens_are_the_top_cls_attention_of_the_eager_tower(eager_llava):
    model, batch = eager_llava
    attention, _ = tower_signals(model, batch["pixel_values"])
    _, _, stats = text_model_inputs(model, VisionZip(keep_ratio=0.25, contextual_share=0.0), batch)
    for row in range(3):
        vision = (batch["input_ids"][row] == IMAGE_TOKEN).nonzero().flatten()
        top = torch.topk(attention[row], 16).indices.sort().values
        assert stats.kept_positions[0][row] == vision[top].tolist()
    # with contextual tokens, the 13 dominant ones are among the 16 kept (13 + round(16·10/64) = 13 + 3)
    _, _, stats = text_model_inputs(model, VisionZip(keep_ratio=0.25), batch)
    for row in range(3):
        vision = (batch["input_ids"][row] == IMAGE_TOKEN).nonzero().flatten()
        assert set(vision[torch.topk(attention[row], 13).indices].tolist()) <= set(stats.kept_positions[0][row])
        assert len(stats.kept_positions[0][row]) == 16


def test_visionzip_enters_the_llm_as_the_paper_rule_computes(eager_llava):
    model, batch = eager_llava
    attention, keys = tower_signals(model, batch["pixel_values"])
    embeds, features = llava_prompt_embeds(model, batch)
    received, mask, stats = text_model_inputs(model, VisionZip(keep_ratio=0.25), batch)
    merged = [reference_visionzip(features[row], attention[row], keys[row], kept=16, contextual=3) for row in range(3)]
    for row, expected in enumerate(expected_rows(batch, embeds, merged)):
        assert torch.allclose(received[row][mask[row].bool()].double(), expected, atol=1e-5)
    assert [counts[0] for counts in stats.vision_tokens_per_layer] == [16, 16, 16]
    assert all(flops > 0 for flops in stats.extra_flops)


def test_tome_enters_the_llm_as_the_plain_loop_computes(eager_llava):
    model, batch = eager_llava
    embeds, features = llava_prompt_embeds(model, batch)
    received, mask, stats = text_model_inputs(model, ToMe(keep_ratio=0.25), batch)
    merged = [reference_tome(features[row], [list(range(64))], [16]) for row in range(3)]
    for row, expected in enumerate(expected_rows(batch, embeds, merged)):
        assert torch.allclose(received[row][mask[row].bool()].double(), expected, atol=1e-5)
    assert [counts[0] for counts in stats.vision_tokens_per_layer] == [16, 16, 16]


# ---- through wrap: keep-all, generation, cache, stats ------------------------------------------------------

@pytest.fixture(scope="module", params=["llava", "llava_next"])
def family(request):
    return build_vlm(request.param, "sdpa", layers=LAYERS)


@pytest.mark.parametrize("name", ["visionzip", "tome"])
def test_keep_ratio_one_is_bit_identical(family, name):
    model, batch = family
    with torch.no_grad():
        stock_logits = model(**batch).logits
        stock_tokens = model.generate(**batch, max_new_tokens=3, do_sample=False)
        with mmreduce.wrap(model, name, keep_ratio=1.0) as reduced:
            assert torch.equal(reduced(**batch).logits, stock_logits)
            assert torch.equal(reduced.generate(**batch, max_new_tokens=3, do_sample=False), stock_tokens)
            assert not reduced.stats.reduced


@pytest.mark.parametrize("method", [VisionZip(keep_ratio=0.25), ToMe(keep_ratio=0.25),
                                    ToMe(keep_ratio=0.25, metric="keys")], ids=["visionzip", "tome", "tome-keys"])
def test_wrapped_generation_cache_and_kept_counts(family, method):
    model, batch = family
    # what each sample keeps: ⌈r·p⌉ per panel of pixel tokens (newline tokens leave with a merged image)
    cells, _ = get_adapter(model).batch_token_layout(batch)
    panels: dict[tuple[int, int], int] = {}
    for cell in cells:
        if cell.panel >= 0:
            panels[(cell.image, cell.panel)] = panels.get((cell.image, cell.panel), 0) + 1
    expected = [sum(keep_count(0.25, p) for (image, _), p in panels.items() if image == row) for row in range(3)]
    with torch.no_grad():
        stock_last = model(**batch).logits[:, -1]
        with mmreduce.wrap(model, method) as reduced:
            logits = reduced(**batch).logits
            assert [counts for counts in reduced.stats.vision_tokens_per_layer] == [[n] * LAYERS for n in expected]
            cached = reduced.generate(**batch, max_new_tokens=4, do_sample=False)
            uncached = reduced.generate(**batch, max_new_tokens=4, do_sample=False, use_cache=False)
    assert logits.shape[:2] == batch["input_ids"].shape and torch.isfinite(logits).all()
    assert (logits[:, -1] - stock_last).abs().max() > 1e-4  # the reduction changed something
    assert torch.equal(cached, uncached)


# ---- bad input -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, fields, message", [
    ("visionzip", dict(keep_ratio=0), r"VisionZip.keep_ratio must be in \(0, 1\]"),
    ("visionzip", dict(keep_ratio=2), r"VisionZip.keep_ratio must be in \(0, 1\]"),
    ("visionzip", dict(contextual_share=1.0), r"VisionZip.contextual_share must be in \[0, 1\)"),
    ("visionzip", dict(contextual_share=-0.1), r"VisionZip.contextual_share must be in \[0, 1\)"),
    ("tome", dict(keep_ratio=0), r"ToMe.keep_ratio must be in \(0, 1\]"),
    ("tome", dict(keep_ratio=2), r"ToMe.keep_ratio must be in \(0, 1\]"),
    ("tome", dict(metric="values"), "ToMe.metric must be 'features' or 'keys'"),
])
def test_bad_fields_are_refused_by_name(name, fields, message):
    with pytest.raises(ValueError, match=message):
        mmreduce.create_method(name, **fields)


def test_visionzip_on_qwen2_vl_is_refused_at_wrap_and_leaves_the_model_alone():
    model, _ = build_vlm("qwen2_vl", "sdpa", layers=2)
    with pytest.raises(ValueError, match="CLS|vision tower"):
        mmreduce.wrap(model, "visionzip")
    with mmreduce.wrap(model, "baseline"):  # nothing was installed: wrapping again is allowed
        pass
