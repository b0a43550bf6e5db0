"""TCC (token-level correlation-guided compression): its pure functions against hand computations, and the method
wrapped on tiny LLaVA-NeXT (crops) and refused on models that give one panel per image."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import mmreduce
from mmreduce.adapters import get_adapter
from mmreduce.methods import TCC, TokenPlan
from mmreduce.methods.tcc import (aggregate_into_kept, allocate_budget, cosine_similarity, information_density,
                                  iqr_outliers, sample_without_replacement, select_in_panel)
from tests.support.vlm_factory import (build_vlm, llava_batch, llava_next_batch, select_samples, tiny_llava,
                                       tiny_llava_next)

LAYERS = 4


@pytest.fixture(scope="module")
def llava_next():
    model = tiny_llava_next("sdpa", layers=LAYERS)
    return model, llava_next_batch(model)


# ---- the IQR rule ----------------------------------------------------------------------------------------------

def test_iqr_outliers_on_hand_made_attention():
    # 1..8 and 100: Q1 = 3, Q3 = 7 (linear interpolation at 2 and 6 of 0..8), IQR 4, fence 7 + 1.5·4 = 13.
    scores = torch.tensor([1.0, 2, 3, 4, 5, 6, 7, 8, 100])
    assert iqr_outliers(scores, 1.5).nonzero().flatten().tolist() == [8]
    # Two high values among eight: sorted [1, 1, 1, 1, 1, 1, 20, 30] -> Q1 = 1, Q3 = 1 + 0.25·19 = 5.75 (position
    # 5.25), IQR 4.75, fence 5.75 + 7.125 = 12.875: both 20 and 30, wherever they are.
    scores = torch.tensor([1.0, 30, 1, 1, 20, 1, 1, 1])
    assert iqr_outliers(scores, 1.5).nonzero().flatten().tolist() == [1, 4]
    # ...with k = 3 the fence is 5.75 + 14.25 = 20: 20 is not above it, 30 is.
    assert iqr_outliers(scores, 3.0).nonzero().flatten().tolist() == [1]
    assert not iqr_outliers(torch.full((16,), 0.0625), 1.5).any()  # uniform attention has no outlier
    assert not iqr_outliers(torch.tensor([0.7]), 1.5).any()


# ---- information density and the budget per panel ------------------------------------------------------------

def test_density_of_identical_orthogonal_and_mixed_panels():
    identical = cosine_similarity(torch.ones(16, 8))
    assert information_density(identical, tau=0.9, count_limit=0.1) == 0.0  # 15 twins each > 1.6
    orthogonal = cosine_similarity(torch.eye(16))
    assert information_density(orthogonal, tau=0.5, count_limit=0.0) == 1.0  # no token has a twin
    # Hand-made similarities: tokens 0, 1, 2 alike (0.95), token 3 alike to none. count_limit 0.25 of 4 tokens:
    # a token with more than 1 alike token is redundant -> 0, 1, 2 -> redundancy 3/4, density 1/4.
    similarity = torch.eye(4, dtype=torch.float64)
    similarity[:3, :3] = torch.where(torch.eye(3, dtype=torch.bool), 1.0, 0.95)
    assert information_density(similarity, tau=0.9, count_limit=0.25) == 0.25
    assert information_density(similarity, tau=0.96, count_limit=0.25) == 1.0  # 0.95 is not above tau
    assert information_density(similarity, tau=0.9, count_limit=0.5) == 1.0  # 2 alike is not more than 2


def test_budget_follows_density_on_hand_made_panels():
    keys = [torch.ones(16, 8), torch.eye(16), torch.cat([torch.eye(8), torch.eye(8)])]  # identical, orthogonal, pairs
    density = torch.tensor([information_density(cosine_similarity(k), 0.9, 0.0) for k in keys])
    assert density.tolist() == [0.0, 1.0, 0.0]  # each of the pairs has one twin, more than 0·16
    budgets = allocate_budget(density, torch.tensor([16, 16, 16]), 12)
    assert budgets.tolist() == [1, 10, 1]  # the minimum for the redundant panels, the rest to the orthogonal one
    # Shares clamp(λ·d, 1, size) with Σ = 12 for d = (0, 1, 0.5): 1 + λ + λ/2 = 12 -> λ = 22/3 -> (1, 7.33, 3.67);
    # floors (1, 7, 3) leave 1, which goes to the largest remainder (0.67).
    assert allocate_budget(torch.tensor([0.0, 1.0, 0.5]), torch.tensor([16, 16, 16]), 12).tolist() == [1, 7, 4]
    # A panel cannot take more than it has: (1, 1) density, sizes (2, 16), 10 tokens -> 2 + λ = 10 -> (2, 8).
    assert allocate_budget(torch.tensor([1.0, 1.0]), torch.tensor([2, 16]), 10).tolist() == [2, 8]
    # Density 0 gets its minimum until the others are full; then the rest is split evenly among such panels.
    assert allocate_budget(torch.tensor([0.0, 1.0]), torch.tensor([4, 4]), 6).tolist() == [2, 4]
    assert allocate_budget(torch.tensor([0.0, 0.0, 0.0]), torch.tensor([4, 4, 4]), 7).tolist() == [3, 2, 2]
    assert allocate_budget(torch.tensor([0.3, 0.0]), torch.tensor([5, 3]), 8).tolist() == [5, 3]  # keep all


def test_budgets_sum_exactly_and_stay_in_bounds():
    generator = torch.Generator().manual_seed(0)
    for _ in range(200):
        panels = int(torch.randint(1, 7, (1,), generator=generator))
        sizes = torch.randint(1, 30, (panels,), generator=generator)
        density = torch.rand(panels, generator=generator) * (torch.rand(panels, generator=generator) > 0.3)
        total = int(torch.randint(panels, int(sizes.sum()) + 1, (1,), generator=generator))
        budgets = allocate_budget(density, sizes, total)
        assert int(budgets.sum()) == total
        assert bool((budgets >= 1).all()) and bool((budgets <= sizes).all())
        # A denser panel that is not full never gets fewer tokens than a sparser one (up to rounding).
        for i in range(panels):
            for j in range(panels):
                if density[i] > density[j] and budgets[i] < sizes[i]:
                    assert budgets[i] >= budgets[j] - 1
        if bool((budgets[density > 0] < sizes[density > 0]).any()):
            assert budgets.tolist() == reference_budget(density.tolist(), sizes.tolist(), total)


def reference_budget(density: list[float], sizes: list[int], total: int) -> list[int]:
    """Shares clamp(λ·d, 1, size) with λ found by bisection, then Hamilton's largest-remainder rounding."""
    def shares(scale):
        return [min(size, max(1.0, scale * d)) for d, size in zip(density, sizes)]

    low, high = 0.0, 1e9
    for _ in range(200):
        middle = (low + high) / 2
        low, high = (middle, high) if sum(shares(middle)) < total else (low, middle)
    quota = shares(high)
    out = [math.floor(q + 1e-9) for q in quota]
    order = sorted(range(len(quota)), key=lambda i: (-(quota[i] - out[i]), i))
    for i in order[:total - sum(out)]:
        out[i] += 1
    return out


def test_impossible_budgets_are_refused():
    with pytest.raises(ValueError, match="a budget of 33 tokens is more than the 32 the panels have"):
        allocate_budget(torch.tensor([1.0, 1.0]), torch.tensor([16, 16]), 33)
    with pytest.raises(ValueError, match="cannot give each of the 3 panels one token; keep at least 3"):
        allocate_budget(torch.tensor([1.0, 1.0, 1.0]), torch.tensor([16, 16, 16]), 2)


# ---- sampling and selection ------------------------------------------------------------------------------------

def test_sampling_is_seeded_and_without_replacement():
    weights = torch.tensor([0.5, 0.1, 0.1, 0.05, 0.05, 0.1, 0.1, 0.0])
    first = sample_without_replacement(weights, 6, torch.Generator().manual_seed(11))
    again = sample_without_replacement(weights, 6, torch.Generator().manual_seed(11))
    assert torch.equal(first, again)
    assert len(set(first.tolist())) == 6
    draws = {tuple(sample_without_replacement(weights, 6, torch.Generator().manual_seed(s)).tolist())
             for s in range(20)}
    assert len(draws) > 1  # the seed matters
    # All 8 tokens when the budget asks for all of them, the zero-weight one included (drawn last).
    every = sample_without_replacement(weights, 8, torch.Generator().manual_seed(3))
    assert sorted(every.tolist()) == list(range(8)) and int(every[-1]) == 7
    # The first draw follows the weights: token 0 (weight 1 of 4) a quarter of the time.
    generator = torch.Generator().manual_seed(0)
    hits = sum(int(sample_without_replacement(torch.tensor([1.0, 3.0]), 1, generator)[0]) == 0 for _ in range(4000))
    assert abs(hits / 4000 - 0.25) < 0.03


def test_select_keeps_outliers_first_then_samples_the_budget():
    deep = torch.tensor([1.0, 2, 3, 4, 5, 6, 7, 8, 100, 90, 1, 1])  # two outliers: tokens 8 and 9
    shallow = torch.ones(12)
    for seed in range(10):
        keep = select_in_panel(deep, shallow, 5, 1.5, torch.Generator().manual_seed(seed))
        assert int(keep.sum()) == 5 and bool(keep[8]) and bool(keep[9])
    # A budget smaller than the outliers keeps the most attended of them.
    keep = select_in_panel(deep, shallow, 1, 1.5, torch.Generator().manual_seed(0))
    assert keep.nonzero().flatten().tolist() == [8]
    # With no outlier, only tokens with shallow attention are drawn (while enough have some).
    shallow = torch.tensor([0.0] * 6 + [1.0] * 6)
    keep = select_in_panel(torch.ones(12), shallow, 4, 1.5, torch.Generator().manual_seed(0))
    assert int(keep.sum()) == 4 and not bool(keep[:6].any())


# ---- aggregation -----------------------------------------------------------------------------------------------

def test_aggregation_goes_to_the_most_similar_kept_token_with_weights_that_sum_to_one():
    similarity = torch.tensor([
        [1.0, 0.8, 0.1, 0.2, -0.3],
        [0.8, 1.0, 0.5, 0.0, -0.2],
        [0.1, 0.5, 1.0, 0.6, -0.1],
        [0.2, 0.0, 0.6, 1.0, -0.4],
        [-0.3, -0.2, -0.1, -0.4, 1.0],
    ], dtype=torch.float64)
    keep = torch.tensor([True, False, True, False, False])
    target, weight = aggregate_into_kept(similarity, keep)
    # Token 1: 0.8 to token 0 beats 0.5 to token 2; token 3: 0.6 to token 2; token 4 resembles nothing kept.
    assert target.tolist() == [0, 0, 2, 2, -1]
    expected = [1 / 1.8, 0.8 / 1.8, 1 / 1.6, 0.6 / 1.6, 0.0]
    assert torch.allclose(weight, torch.tensor(expected, dtype=torch.float64))
    for kept in (0, 2):
        assert math.isclose(float(weight[target == kept].sum()), 1.0)
    features = torch.randn(5, 3)
    plan = TokenPlan(keep, target, weight.float())
    plan.check(5)
    merged = plan.apply(features)
    assert torch.allclose(merged[0], (features[0] + 0.8 * features[1]) / 1.8, atol=1e-6)
    assert torch.allclose(merged[1], (features[2] + 0.6 * features[3]) / 1.6, atol=1e-6)


# ---- the method ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, field", [
    (dict(keep_ratio=0.0), "keep_ratio"), (dict(keep_ratio=1.5), "keep_ratio"), (dict(tau=1.2), "tau"),
    (dict(tau=float("nan")), "tau"), (dict(count_limit=-0.1), "count_limit"), (dict(count_limit=2), "count_limit"),
    (dict(iqr_k=-1), "iqr_k"), (dict(iqr_k=float("inf")), "iqr_k"), (dict(deep_layer=1.5), "deep_layer"),
    (dict(shallow_layer=True), "shallow_layer"), (dict(corr_layer="last"), "corr_layer"),
])
def test_fields_are_validated(kwargs, field):
    with pytest.raises(ValueError, match=f"TCC.{field} must"):
        TCC(**kwargs)


def test_spec_strings_build_tcc():
    assert mmreduce.parse_spec("tcc:keep_ratio=0.22,tau=0.7").build() == TCC(keep_ratio=0.22, tau=0.7)
    assert mmreduce.parse_spec("tcc:deep_layer=-1,shallow_layer=1").build() == TCC(deep_layer=-1, shallow_layer=1)
    assert mmreduce.method_class("tcc") is TCC and mmreduce.TCC is TCC


def test_keep_all_is_bit_identical_on_llava_next(llava_next):
    model, batch = llava_next
    with torch.no_grad():
        stock_logits = model(**batch).logits
        stock_tokens = model.generate(**batch, max_new_tokens=4, do_sample=False)
        with mmreduce.wrap(model, TCC(keep_ratio=1.0)) as reduced:
            logits = reduced(**batch).logits
            tokens = reduced.generate(**batch, max_new_tokens=4, do_sample=False)
            assert not reduced.stats.reduced
    assert torch.equal(logits, stock_logits) and torch.equal(tokens, stock_tokens)


class Recording(TCC):
    """TCC that keeps what each `plan` saw and returned (the test reads the method's own inputs)."""

    def plan(self, tokens):
        result = super().plan(tokens)
        self.seen.append((tokens, result))
        return result


def test_wrap_and_generate_on_llava_next(llava_next):
    model, batch = llava_next
    method = Recording(keep_ratio=0.3, tau=0.9)
    method.seen = []
    with torch.no_grad():
        stock_last = model(**batch).logits[:, -1]
    with torch.no_grad(), mmreduce.wrap(model, method) as reduced:
        logits = reduced(**batch).logits
        cached = reduced.generate(**batch, max_new_tokens=4, do_sample=False)
        counts = reduced.stats.vision_tokens_per_layer
        uncached = reduced.generate(**batch, max_new_tokens=4, do_sample=False, use_cache=False)
        alone = [reduced.generate(**select_samples(batch, row), max_new_tokens=4, do_sample=False)
                 for row in range(batch["input_ids"].shape[0])]
    assert torch.equal(cached, uncached)
    for row, tokens in enumerate(alone):
        assert torch.equal(tokens[0, -4:], cached[row, -4:]), f"sample {row} differs alone vs in the batch"
    assert (stock_last - logits[:, -1]).abs().max() > 1e-3  # the reduction changed the output
    # Pixel tokens per sample, from the family's layout (LLaVA-NeXT's newline tokens cover no pixels).
    cells, _ = get_adapter(model).batch_token_layout(batch)
    vision = (batch["input_ids"] == model.config.image_token_id) & batch["attention_mask"].bool()
    bounds = [0, *vision.sum(dim=1).cumsum(0).tolist()]
    for row in range(len(bounds) - 1):
        pixels = sum(cell.panel >= 0 for cell in cells[bounds[row]:bounds[row + 1]])
        assert counts[row] == [math.ceil(0.3 * pixels)] * LAYERS  # ⌈r·n⌉ of the pixel tokens, newlines gone
    for tokens, plan in method.seen[:3]:  # the first forward's three samples
        panels = {}
        for index, cell in enumerate(tokens.cells):
            panels.setdefault((cell.image, cell.panel), []).append(index)
        assert len(panels) > 1
        unit = F.normalize(tokens.signals["keys@-2"].double(), dim=-1)  # (n, C) the keys TCC compared
        for members in panels.values():
            index = torch.tensor(members)
            assert bool(plan.keep[index].any())  # every panel keeps at least one token
            kept = index[plan.keep[index]]
            for token in index[~plan.keep[index]].tolist():  # merged into its most similar kept token of its panel
                similarity = unit[token] @ unit[kept].T
                if float(similarity.max()) > 0:
                    assert int(plan.target[token]) == int(kept[similarity.argmax()])
            # The deep-attention IQR outliers of the panel are kept (unless there are more than its budget).
            deep = tokens.signals["cls_attention@-2"][index].double()
            q1, q3 = deep.quantile(0.25), deep.quantile(0.75)
            outliers = index[deep > q3 + 1.5 * (q3 - q1)]
            if outliers.numel() <= int(plan.keep[index].sum()):
                assert bool(plan.keep[outliers].all())


def test_refused_where_images_are_one_panel_each():
    model, batch = tiny_llava("sdpa", layers=LAYERS), llava_batch()
    with torch.no_grad():
        stock = model(**batch).logits
        refusal = "tcc allocates a budget across crops; this model gives one panel per image .*use visionzip or pool"
        with mmreduce.wrap(model, TCC(keep_ratio=0.25)) as reduced, pytest.raises(ValueError, match=refusal):
            reduced(**batch)
        assert torch.equal(model(**batch).logits, stock)  # nothing was left behind
    qwen, qwen_batch = build_vlm("qwen2_vl", "sdpa", layers=LAYERS)
    with torch.no_grad():
        stock = qwen(**qwen_batch).logits
        # Refused at wrap, before any hook is installed: its tower has no CLS token (nor, so far, an attention probe).
        with pytest.raises(ValueError, match="vision tower"):
            mmreduce.wrap(qwen, TCC(keep_ratio=0.25))
        assert torch.equal(qwen(**qwen_batch).logits, stock)


def test_a_budget_below_one_token_per_panel_is_refused(llava_next):
    model, batch = llava_next
    refusal = "tcc keeps at least one token of each of the sample's .* raise keep_ratio to at least"
    with torch.no_grad(), mmreduce.wrap(model, TCC(keep_ratio=0.02)) as reduced, \
            pytest.raises(ValueError, match=refusal):
        reduced(**batch)
