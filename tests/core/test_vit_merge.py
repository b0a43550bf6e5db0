"""ToMe inside a ViT (`mmreduce.vit_merge`): the matching, the weighted merge, proportional attention and the
reversible patch on tiny timm and open_clip ViTs built from config (random weights, no downloads).

References are built independently of the code under test: hand-made metrics with known pairs, a softmax over
explicitly duplicated tokens, and models whose patch tokens are identical, where merging must change nothing.
"""

from __future__ import annotations

import pytest
import torch

import mmreduce
from mmreduce.vit_merge import (
    bipartite_soft_matching,
    max_merges,
    merge_weighted,
    patch_vit,
    proportional_attention,
    unpatch_vit,
)

timm_vit = pytest.importorskip("timm.models.vision_transformer")
clip_tf = pytest.importorskip("open_clip.transformer")

IMAGE, PATCH = 32, 8
TOKENS = (IMAGE // PATCH) ** 2 + 1  # 16 patches + CLS


def tiny_timm(depth: int = 2, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm_vit.VisionTransformer(img_size=IMAGE, patch_size=PATCH, embed_dim=32, depth=depth, num_heads=2,
                                      num_classes=10, **kwargs).eval()


def tiny_open_clip(depth: int = 2, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return clip_tf.VisionTransformer(image_size=IMAGE, patch_size=PATCH, width=32, layers=depth, heads=2,
                                     mlp_ratio=2.0, output_dim=16, **kwargs).eval()


def images(batch: int = 3) -> torch.Tensor:
    return torch.randn(batch, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(1))


def groups(merge_fn, batch: int, num_tokens: int) -> torch.Tensor:
    """(B, N', N) 0/1 membership: row j lists the original tokens merged into output token j."""
    one_hot = torch.eye(num_tokens).expand(batch, num_tokens, num_tokens)   # token i carries e_i
    return merge_fn(one_hot, mode="sum")


def instance_attributes(model: torch.nn.Module) -> dict:
    return {name: dict(module.__dict__) for name, module in model.named_modules()}


# --- the matching and the merge ---------------------------------------------------------------------------------


def test_merge_weights_sum_to_one_and_sizes_are_conserved():
    batch, num_tokens = 2, 13
    generator = torch.Generator().manual_seed(0)
    metric = torch.randn(batch, num_tokens, 8, generator=generator)
    size = torch.randint(1, 5, (batch, num_tokens, 1), generator=generator).float()
    merge_fn, _ = bipartite_soft_matching(metric, 4)
    weights, merged_size = merge_weighted(torch.eye(num_tokens).expand(batch, -1, -1), size, merge_fn)
    assert weights.shape == (batch, num_tokens - 4, num_tokens)
    torch.testing.assert_close(weights.sum(-1), torch.ones(batch, num_tokens - 4))
    # Within a group the weights are the members' sizes over the group's size.
    member = weights > 0
    expected = member * size.transpose(1, 2) / (member * size.transpose(1, 2)).sum(-1, keepdim=True)
    torch.testing.assert_close(weights, expected)
    assert torch.equal(merged_size.sum(1), size.sum(1))
    # A second step on the merged tokens conserves the total again (sum of sizes == N for unit start sizes).
    merge_again, _ = bipartite_soft_matching(torch.randn(batch, num_tokens - 4, 8, generator=generator), 3)
    _, size_two = merge_weighted(torch.randn(batch, num_tokens - 4, 5), merged_size, merge_again)
    assert torch.equal(size_two.sum(1), size.sum(1))
    _, from_ones = merge_weighted(torch.randn(batch, num_tokens, 5), None, merge_fn)
    assert from_ones.sum(1).flatten().tolist() == [num_tokens] * batch


def test_survivors_keep_their_original_order_and_cls_stays_alone():
    batch, num_tokens, r = 3, 17, 6
    metric = torch.randn(batch, num_tokens, 4, generator=torch.Generator().manual_seed(2))
    merge_fn, unmerge_fn = bipartite_soft_matching(metric, r)
    membership = groups(merge_fn, batch, num_tokens)                       # (B, N - r, N)
    assert torch.equal(membership.sum(1), torch.ones(batch, num_tokens))    # every token in exactly one group
    for b in range(batch):
        rows = [torch.nonzero(row).flatten().tolist() for row in membership[b]]
        assert rows[0] == [0]                                                # CLS: first and never merged
        moved = [i for row in rows if len(row) > 1 for i in row if i % 2 == 0]
        assert len(moved) == r and all(sum(j % 2 for j in row) <= 1 for row in rows)
        # Each output token sits where its surviving member was: survivors in increasing original order.
        survivors = [next((i for i in row if i % 2 == 1), row[0]) for row in rows]
        assert survivors == sorted(set(range(num_tokens)) - set(moved))
    # unmerge sends every original position its group's value.
    y = torch.randn(batch, num_tokens - r, 2)
    assert torch.equal(unmerge_fn(y), membership.transpose(1, 2) @ y)


def test_hand_made_metric_merges_the_pairs_built_in():
    # Positions 0..8: A = 0 (CLS), 2, 4, 6, 8; B = 1, 3, 5, 7.
    e = torch.eye(8)
    metric = torch.stack([
        e[3],                          # 0 CLS: identical to B token 3, must stay protected
        e[0],                          # 1 B
        e[1] + 0.01 * e[7],            # 2 A: almost identical to B 5 (cos ~ 1.0)
        e[3],                          # 3 B
        e[4] + 0.3 * e[6],             # 4 A: cos 0.29 with B 7
        e[1],                          # 5 B
        e[0] + 0.5 * e[5],             # 6 A: cos 0.89 with B 1
        e[6],                          # 7 B
        e[2],                          # 8 A: orthogonal to every B token
    ]).unsqueeze(0)
    x = torch.arange(9.0).reshape(1, 9, 1) * 10                              # token i carries 10·i
    merge_fn, _ = bipartite_soft_matching(metric, 2)
    merged, size = merge_weighted(x, None, merge_fn)
    # r=2 merges 2→5 and 6→1; survivors in order 0, 1(+6), 3, 4, 5(+2), 7, 8.
    assert merged.flatten().tolist() == [0, 35, 30, 40, 35, 70, 80]
    assert size.flatten().tolist() == [1, 2, 1, 1, 2, 1, 1]
    merge_three, _ = bipartite_soft_matching(metric, 3)
    assert merge_weighted(x, None, merge_three)[0].flatten().tolist() == [0, 35, 30, 35, 55, 80]   # + 4→7
    # Without protection the CLS token (cos 1 with B 3) is merged first.
    unprotected, _ = bipartite_soft_matching(metric, 1, protect_first=False)
    assert merge_weighted(x, None, unprotected)[0].flatten().tolist() == [10, 20, 15, 40, 50, 60, 70, 80]


def test_matching_limits_and_bad_r():
    assert [max_merges(n) for n in (1, 2, 3, 17, 197)] == [0, 0, 1, 8, 98]
    assert [max_merges(n, protect_first=False) for n in (1, 2, 3, 16)] == [0, 1, 2, 8]
    metric = torch.randn(1, 17, 4)
    bipartite_soft_matching(metric, 8)
    for bad in (9, -1, True, 2.0):
        with pytest.raises(ValueError, match="cannot be merged from 17 tokens; use an int in 0..8"):
            bipartite_soft_matching(metric, bad)


def test_proportional_attention_equals_attention_over_duplicated_tokens():
    generator = torch.Generator().manual_seed(3)
    batch, heads, num_tokens, head_dim = 2, 3, 6, 4
    q, k, v = (torch.randn(batch, heads, num_tokens, head_dim, generator=generator) for _ in range(3))
    sizes = [1, 2, 1, 3, 1, 1]                      # token 1 stands for 2 patches, token 3 for 3
    size = torch.tensor(sizes, dtype=torch.float).reshape(1, num_tokens, 1).expand(batch, -1, -1)
    out = proportional_attention(q, k, v, size, scale=0.7)

    # Reference: plain softmax attention with every token repeated `size` times among the keys and values.
    repeat = torch.tensor(sizes)
    k_dup, v_dup = k.repeat_interleave(repeat, dim=2), v.repeat_interleave(repeat, dim=2)   # (B, H, 9, hd)
    weights = torch.softmax(q @ k_dup.transpose(-1, -2) * 0.7, dim=-1)
    torch.testing.assert_close(out, weights @ v_dup, rtol=1e-5, atol=1e-6)
    plain = torch.softmax(q @ k.transpose(-1, -2) * 0.7, dim=-1) @ v
    torch.testing.assert_close(proportional_attention(q, k, v, None, scale=0.7), plain, rtol=1e-5, atol=1e-6)


# --- the patch on timm and open_clip ViTs ------------------------------------------------------------------------


@pytest.mark.parametrize("build", [tiny_timm, tiny_open_clip], ids=["timm", "open_clip"])
def test_r0_gives_the_unpatched_outputs_and_remove_restores_them_bit_for_bit(build):
    model, x = build(), images()
    before = instance_attributes(model)
    with torch.no_grad():
        reference = model(x)
        with patch_vit(model, 0) as handle:
            # timm: the same SDPA call, bit-identical; open_clip: MHA's fused kernel vs SDPA, within 1e-6.
            torch.testing.assert_close(model(x), reference, rtol=0, atol=1e-6)
            assert handle.tokens_per_block == [TOKENS, TOKENS] and handle.last_size is None
        with patch_vit(model, [4, 3]):
            assert not torch.allclose(model(x), reference, atol=1e-4)   # merging does change the features
        assert torch.equal(model(x), reference)
    assert instance_attributes(model) == before


@pytest.mark.parametrize("build", [tiny_timm, tiny_open_clip], ids=["timm", "open_clip"])
def test_token_count_per_block_is_n_minus_cumulative_r(build):
    model = build(depth=4)
    with patch_vit(model, [3, 0, 2, 4]) as handle, torch.no_grad():
        model(images(2))
        assert handle.tokens_per_block == [TOKENS - 3, TOKENS - 3, TOKENS - 5, TOKENS - 9]
        assert handle.last_size.sum(1).flatten().tolist() == [TOKENS, TOKENS]
        model(images(1))   # a new forward starts from unit sizes again
        assert handle.tokens_per_block == [14, 14, 12, 8] and handle.last_size.shape == (1, 8, 1)


def test_an_int_r_is_clamped_per_block_as_in_the_paper():
    model = tiny_timm(depth=4)
    with patch_vit(model, 5) as handle, torch.no_grad():
        model(images(1))
    # 17 tokens: 5 merged (limit 8) -> 12: 5 (limit 5) -> 7: 3 (limit 3) -> 4: 1 (limit 1) -> 3.
    assert handle.r == (5, 5, 3, 1) and handle.tokens_per_block == [12, 7, 4, 3]
    with pytest.raises(ValueError, match=r"r\[1\]=6 but block 1 gets 12 tokens and can merge at most 5"):
        patch_vit(model, [5, 6, 0, 0])


def constant_patches(model: torch.nn.Module, family: str) -> None:
    """Zero the patch positional embeddings: a constant image then gives identical patch tokens."""
    with torch.no_grad():
        if family == "timm":
            model.pos_embed[:, model.num_prefix_tokens:] = 0
        else:
            model.positional_embedding[1:] = 0


@pytest.mark.parametrize("family, kwargs", [
    ("timm", {}),
    ("timm", {"global_pool": "avg"}),
    ("timm", {"global_pool": "avg", "class_token": False}),
    ("timm", {"global_pool": "avgmax"}),
    ("open_clip", {}),
    ("open_clip", {"pool_type": "avg"}),
])
def test_merging_identical_patches_changes_nothing(family, kwargs):
    # Merged identical tokens are that token with a larger size; proportional attention and the size-weighted
    # pool make the model compute exactly what it computed on the full sequence.
    model = tiny_timm(depth=3, **kwargs) if family == "timm" else tiny_open_clip(depth=3, **kwargs)
    constant_patches(model, family)
    x = torch.ones(2, 3, IMAGE, IMAGE) * torch.tensor([0.2, -0.4, 0.9]).reshape(1, 3, 1, 1)
    with torch.no_grad():
        reference = model(x)
        with patch_vit(model, [6, 4, 3]) as handle:
            merged = model(x)
        assert handle.tokens_per_block[-1] < TOKENS // 2
    torch.testing.assert_close(merged, reference, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family, kwargs", [
    ("timm", {}),
    ("timm", {"global_pool": "avg"}),
    ("timm", {"global_pool": "avg", "class_token": False}),
    ("open_clip", {"pool_type": "avg"}),
])
def test_a_duplicated_patch_merges_first_and_changes_nothing(family, kwargs):
    # Patch 1 is a pixel copy of patch 0 with the same position embedding: the two tokens stay identical, the
    # matching must pair them (cosine 1), and after merging one token of size 2 carries them. Every other token
    # differs, so the sizes are uneven and an unweighted average pool would give another result.
    model = tiny_timm(depth=3, **kwargs) if family == "timm" else tiny_open_clip(depth=3, **kwargs)
    with torch.no_grad():
        if family == "timm":
            first = model.num_prefix_tokens
            model.pos_embed[:, first + 1] = model.pos_embed[:, first]
        else:
            model.positional_embedding[2] = model.positional_embedding[1]
    x = images(2)
    x[..., :PATCH, PATCH:2 * PATCH] = x[..., :PATCH, :PATCH]
    with torch.no_grad():
        reference = model(x)
        with patch_vit(model, [1, 0, 0]) as handle:
            merged = model(x)
    assert handle.last_size.flatten(1).max(1).values.tolist() == [2, 2]
    torch.testing.assert_close(merged, reference, rtol=1e-4, atol=1e-5)


def test_a_whole_clip_model_is_patched_through_visual_and_gradients_flow():
    class TinyClip(torch.nn.Module):   # what patch_vit reads of a CLIP model: its .visual
        def __init__(self):
            super().__init__()
            self.visual = tiny_open_clip()

    clip = TinyClip().train()
    with patch_vit(clip, 3) as handle:
        assert handle.model is clip.visual and handle.family == "open_clip"
        clip.visual(images(2)).sum().backward()
        assert clip.visual.transformer.resblocks[0].attn.in_proj_weight.grad.abs().sum() > 0
        with pytest.raises(ValueError, match="already patched"):
            patch_vit(clip.visual, 1)
    with pytest.raises(ValueError, match="not patched by patch_vit"):
        unpatch_vit(clip)


@pytest.mark.parametrize("build", [tiny_timm, tiny_open_clip], ids=["timm", "open_clip"])
def test_double_patch_is_refused_and_unpatch_vit_removes(build):
    model = build()
    before = instance_attributes(model)
    handle = patch_vit(model, 2)
    patched = instance_attributes(model)
    with pytest.raises(ValueError, match=r"already patched by patch_vit \(r=\[2, 2\]\); call handle.remove\(\)"):
        patch_vit(model, 1)
    assert instance_attributes(model) == patched   # the refused call changed nothing
    assert unpatch_vit(model) is model and not handle.active
    assert instance_attributes(model) == before
    handle.remove()                                # a second remove is harmless


def unsupported_models():
    torchvision_vit = pytest.importorskip("torchvision.models.vision_transformer")
    convnext = pytest.importorskip("timm.models.convnext")
    return [
        torchvision_vit.VisionTransformer(image_size=IMAGE, patch_size=PATCH, num_layers=1, num_heads=2,
                                          hidden_dim=16, mlp_dim=32),
        convnext.ConvNeXt(depths=(1, 1, 1, 1), dims=(8, 8, 8, 8), num_classes=2),
        tiny_timm(block_fn=timm_vit.ResPostBlock),
    ]


def test_unsupported_architectures_raise_type_error_and_change_nothing():
    for model in unsupported_models():
        before = instance_attributes(model)
        with pytest.raises(TypeError) as error:
            patch_vit(model, 1)
        message = str(error.value)
        assert message.startswith("patch_vit supports timm VisionTransformer and open_clip VisionTransformer, "
                                  f"got {type(model).__module__}.{type(model).__qualname__}; ")
        assert "\n" not in message
        assert instance_attributes(model) == before


@pytest.mark.parametrize("r, message", [
    (-1, "r=-1 is not an int >= 0"),
    ([1, 2, 3], "r has 3 entries but the model has 2 blocks; give one per block"),
    ([1, 1.5], r"r\[1\]=1.5 is not an int >= 0"),
    (True, "r must be an int or a list of 2 ints"),
    ([10, 6], ("r merges 16 tokens in total but the model has 16 patch tokens; lower r so that at least one "
               "token besides CLS remains")),
    ([2, 8], r"r\[1\]=8 but block 1 gets 15 tokens and can merge at most 7 .*; lower r at that block"),
])
def test_bad_r_is_refused_with_one_line(r, message):
    model = tiny_timm()
    before = instance_attributes(model)
    with pytest.raises(ValueError, match=message) as error:
        patch_vit(model, r)
    assert "\n" not in str(error.value)
    assert instance_attributes(model) == before


def test_registers_and_attention_pooling_are_refused():
    with pytest.raises(ValueError, match="prefix tokens"):
        patch_vit(tiny_timm(reg_tokens=2), 1)
    with pytest.raises(ValueError, match="pools with attention"):
        patch_vit(tiny_timm(global_pool="map"), 1)


def test_patch_vit_is_public():
    assert {"patch_vit", "unpatch_vit"} <= set(mmreduce.__all__)
    assert mmreduce.patch_vit is patch_vit and mmreduce.unpatch_vit is unpatch_vit


def test_the_throughput_benchmark_counts_vit_b_flops_as_published():
    from mmreduce.eval.vit_throughput import block_flops, token_schedule

    # ViT-B/16 at 224 px is quoted at 17.6 GMACs (Dosovitskiy et al.; timm's model card): 12 blocks of 197 tokens
    # plus the 16×16×3 patch embedding of 196 patches.
    schedule = token_schedule(197, [0] * 12)
    macs = (sum(block_flops(n_in, n_out, 768, 3072) for n_in, n_out in schedule) + 2 * 196 * 768 * 768) / 2
    assert round(macs / 1e9, 1) == 17.6
    # Merging happens between attention and MLP: attention sees the tokens entering, the MLP those leaving.
    assert token_schedule(197, [16] * 11 + [10])[-1] == (21, 11)
    assert block_flops(21, 11, 768, 3072) < block_flops(21, 21, 768, 3072)
