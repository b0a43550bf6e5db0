"""TokenUnify: raster tokens, the three corruptions on known inputs, Mamba scan vs a scalar loop, affinities,
segmentation metrics against hand-computed values, model shapes and gradients."""

import math

import numpy as np
import pytest
import torch

from mmreduce.tokenizers_visual.tokenunify.data import affinities, make_volume
from mmreduce.tokenizers_visual.tokenunify.experiment import (fit_neighbour_regression, neighbour_context,
                                                              unpatchify_affinities)
from mmreduce.tokenizers_visual.tokenunify.mamba import BiMambaBlock, MambaMixer, selective_scan
from mmreduce.tokenizers_visual.tokenunify.model import TokenUnifyConfig, TokenUnifyModel
from mmreduce.tokenizers_visual.tokenunify.segment import segment_affinities, segmentation_scores
from mmreduce.tokenizers_visual.tokenunify.tokens import (patchify, prefix_corrupt, random_token_corrupt,
                                                          sample_prefix, unpatchify)


def test_patchify_2d_raster_order():
    x = torch.arange(16.0).reshape(1, 4, 4)
    t = patchify(x, (2, 2))
    # patches in raster order: top-left, top-right, bottom-left, bottom-right; voxels row-major inside
    assert t[0].tolist() == [[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]]
    assert torch.equal(unpatchify(t, (4, 4), (2, 2)), x)


def test_patchify_3d_raster_order():
    x = torch.arange(32.0).reshape(1, 2, 4, 4)  # (B, D, H, W)
    t = patchify(x, (2, 2, 2))
    assert t.shape == (1, 4, 8)
    # token 1 = z 0..1, y 0..1, x 2..3: values z*16 + y*4 + x
    assert t[0, 1].tolist() == [2, 3, 6, 7, 18, 19, 22, 23]
    assert torch.equal(unpatchify(t, (2, 4, 4), (2, 2, 2)), x)
    with pytest.raises(ValueError, match="divisible"):
        patchify(x, (2, 3, 2))


def test_random_token_corruption_counts_and_fill():
    x = torch.arange(1.0, 1 + 2 * 5 * 3).reshape(2, 5, 3)  # all non-zero
    out, mask = random_token_corrupt(x, ratio=0.4, fill="zero", generator=torch.Generator().manual_seed(0))
    assert mask.sum(1).tolist() == [2, 2]  # floor(0.4 * 5) = 2 per sample
    assert torch.equal(out[mask], torch.zeros(4, 3)) and torch.equal(out[~mask], x[~mask])
    with pytest.raises(ValueError, match="ratio"):
        random_token_corrupt(x, ratio=1.0)


def test_prefix_corruption_next_and_all_targets():
    x = torch.arange(1.0, 1 + 2 * 4 * 2).reshape(2, 4, 2)
    k = torch.tensor([1, 3])
    out, target = prefix_corrupt(x, k, fill="zero")
    assert out[0].tolist() == [[1, 2], [0, 0], [0, 0], [0, 0]]
    assert out[1].tolist() == [[9, 10], [11, 12], [13, 14], [0, 0]]
    assert target.tolist() == [[3, 4], [15, 16]]  # token k: the first replaced one
    noisy, _ = prefix_corrupt(x, k, fill="noise", generator=torch.Generator().manual_seed(0))
    assert torch.equal(noisy[0, :1], x[0, :1]) and not torch.equal(noisy[0, 1:], x[0, 1:])
    ks = sample_prefix(1000, 4, torch.Generator().manual_seed(0))
    assert set(ks.tolist()) == {1, 2, 3}
    with pytest.raises(ValueError, match="k must be"):
        prefix_corrupt(x, torch.tensor([0, 1]))


def test_selective_scan_matches_scalar_loop():
    g = torch.Generator().manual_seed(0)
    b, length, di, n = 1, 4, 2, 3
    x, dt = torch.randn(b, length, di, generator=g), torch.rand(b, length, di, generator=g)
    a = -torch.rand(di, n, generator=g) - 0.1
    bb, cc = torch.randn(b, length, n, generator=g), torch.randn(b, length, n, generator=g)
    d = torch.randn(di, generator=g)
    y = selective_scan(x, dt, a, bb, cc, d)
    for i in range(di):
        h = [0.0] * n
        for t in range(length):
            xt, dtt = x[0, t, i].item(), dt[0, t, i].item()
            h = [math.exp(dtt * a[i, s].item()) * h[s] + dtt * bb[0, t, s].item() * xt for s in range(n)]
            want = sum(cc[0, t, s].item() * h[s] for s in range(n)) + d[i].item() * xt
            assert y[0, t, i].item() == pytest.approx(want, rel=1e-5, abs=1e-6)


def test_mamba_mixer_is_causal_and_block_is_bidirectional():
    torch.manual_seed(0)
    mixer, block = MambaMixer(8, d_state=2), BiMambaBlock(8, d_state=2)
    x = torch.randn(1, 6, 8)
    y2 = x.clone()
    y2[:, 4] += torch.randn(8)  # not a constant: the block's LayerNorm would remove it
    assert torch.allclose(mixer(x)[:, :4], mixer(y2)[:, :4], atol=1e-6)
    assert not torch.allclose(mixer(x)[:, 4:], mixer(y2)[:, 4:])
    assert not torch.allclose(block(x)[:, :4], block(y2)[:, :4])  # the reversed scan carries it back


def test_affinities_hand_values():
    labels = torch.tensor([[1, 1, 2], [1, 3, 2]])
    aff = affinities(labels, 2)
    assert aff[0].tolist() == [[0, 0, 0], [1, 0, 1]]  # rows: same as the voxel above?
    assert aff[1].tolist() == [[0, 1, 0], [0, 0, 0]]  # cols: same as the voxel to the left?


def test_segmentation_scores_hand_values():
    gt = np.array([[1, 1, 2, 2]])
    one = np.ones_like(gt)
    s = segmentation_scores(gt, one)
    # merging two equal halves: H(gt | seg) = 1 bit, H(seg | gt) = 0; ARAND = 1 - 2PR/(P+R) with
    # P = (sum n_ij^2 - n) / (sum b_j^2 - n) = (8-4)/(16-4) = 1/3, R = (8-4)/(8-4) = 1 -> 0.5
    assert s["voi"] == pytest.approx(1.0) and s["voi_merge"] == pytest.approx(1.0) and s["arand"] == pytest.approx(0.5)
    assert segmentation_scores(gt, gt)["voi"] == pytest.approx(0.0, abs=1e-12)


def test_watershed_recovers_two_blocks_from_true_affinities():
    labels = np.ones((6, 6), dtype=np.int64)
    labels[:, 3:] = 2
    seg = segment_affinities(affinities(torch.from_numpy(labels), 2).numpy(), min_seed=1)
    assert segmentation_scores(labels, seg)["voi"] == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="aff must be"):
        segment_affinities(np.zeros((3, 4, 4)))


def test_em_volume_generator():
    img, lab = make_volume((4, 16, 16), seed=0)
    img2, lab2 = make_volume((4, 16, 16), seed=0)
    assert np.array_equal(img, img2) and np.array_equal(lab, lab2)
    assert img.shape == lab.shape == (4, 16, 16) and img.min() == 0.0 and img.max() == 1.0 and lab.min() >= 1
    # membranes are dark: voxels at a label change are darker on average than the rest
    edge = np.zeros_like(lab, dtype=bool)
    edge[:, 1:] |= lab[:, 1:] != lab[:, :-1]
    assert img[edge].mean() < img[~edge].mean()
    with pytest.raises(ValueError, match="shape"):
        make_volume((4,), seed=0)


@pytest.mark.parametrize("volume, patch", [((4, 8, 8), (2, 4, 4)), ((8, 8), (4, 4))])
def test_model_objectives_shapes_and_gradients(volume, patch):
    torch.manual_seed(0)
    cfg = TokenUnifyConfig(volume=volume, patch=patch, width=8, depth=1, d_state=2)
    model = TokenUnifyModel(cfg)
    vols = torch.rand(2, *volume)
    for objective in ("masked", "next", "next_all", "tokenunify"):
        model.zero_grad(set_to_none=True)
        loss = model.loss(vols, objective, torch.Generator().manual_seed(1))
        loss.backward()
        assert loss.item() > 0 and model.embed.weight.grad.abs().sum() > 0
        uses_next = objective in ("next", "tokenunify")
        assert (model.next_head.weight.grad is not None) == uses_next
        assert (model.pixel_head.weight.grad is not None) == (objective != "next")
    logits = model.affinity_logits(patchify(vols, patch))
    assert unpatchify_affinities(logits, cfg).shape == (2, len(volume), *volume)
    with pytest.raises(ValueError, match="objective"):
        model.loss(vols, "nope")


def test_config_validation():
    with pytest.raises(ValueError, match="divisible"):
        TokenUnifyConfig(volume=(8, 30, 30), patch=(2, 8, 8))
    with pytest.raises(ValueError, match="width"):
        TokenUnifyConfig(width=0)


def test_neighbour_context_hand_values_and_regression_recovers_a_linear_rule():
    # A 2 x 2 x 3 token grid with scalar tokens 0..11 in raster order (slab, row, column).
    x = torch.arange(12.0).reshape(1, 12, 1)
    context = neighbour_context(x.expand(3, -1, -1), torch.tensor([0, 4, 10]), (2, 2, 3))
    # token 0: no neighbours; token 4 (slab 0, row 1, col 1): left 3, above 1, no slab; token 10: left 9, above 7, slab 4
    assert context.tolist() == [[0, 0, 0, 1], [3, 1, 0, 1], [9, 7, 4, 1]]
    # Tokens built by a known causal linear rule are predicted exactly by the fitted regression.
    gen = torch.Generator().manual_seed(0)
    grid, batch = (2, 3, 4), 40
    tokens = torch.zeros(batch, 24, 2)
    tokens[:, 0] = torch.rand(batch, 2, generator=gen)
    for k in range(1, 24):
        left, above, slab = neighbour_context(tokens, torch.full((batch,), k), grid)[:, :6].split(2, dim=1)
        tokens[:, k] = 0.5 * left + 0.25 * above.flip(1) - 0.2 * slab + 0.1
    weights = fit_neighbour_regression(tokens, grid, ridge=1e-6)
    k = torch.arange(1, 24).repeat(batch)
    rows = torch.arange(batch).repeat_interleave(23)
    predicted = neighbour_context(tokens[rows], k, grid) @ weights
    assert (predicted - tokens[rows, k]).abs().max() < 1e-3
    # The mean token, by contrast, is far off: the test has something to detect.
    assert (tokens[rows, k] - tokens[rows, k].mean(0)).abs().max() > 0.1
