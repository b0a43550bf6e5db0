"""VQ: nearest code, straight-through, SEED's legacy loss weighting, EMA, k-means init, dead-code restart, stats.

Expected values are worked out by hand in the comments.
"""

import math

import pytest
import torch

from mmreduce.tokenizers_visual.vq import VQConfig, VectorQuantizer, codebook_stats, kmeans


def _vq(codebook, **kw):
    cfg = VQConfig(codebook_size=len(codebook), dim=len(codebook[0]), **kw)
    vq = VectorQuantizer(cfg)
    vq.codebook.data = torch.tensor(codebook, dtype=torch.float32)
    if cfg.ema_decay is not None:
        vq.ema_sum.copy_(vq.codebook)
    return vq


def test_codebook_stats_hand_values():
    usage, ppl = codebook_stats(torch.tensor([0, 0, 1, 1]), 4)
    assert usage.item() == 0.5 and ppl.item() == pytest.approx(2.0)
    usage, ppl = codebook_stats(torch.tensor([3, 2, 1, 0]), 4)
    assert usage.item() == 1.0 and ppl.item() == pytest.approx(4.0)
    # p = (3/4, 1/4): H = -(0.75 ln 0.75 + 0.25 ln 0.25) = 0.562335
    _, ppl = codebook_stats(torch.tensor([[0, 0], [0, 1]]), 8)
    assert ppl.item() == pytest.approx(math.exp(0.5623351446), rel=1e-6)


def test_codebook_stats_rejects_bad_ids():
    with pytest.raises(ValueError, match="lie in"):
        codebook_stats(torch.tensor([0, 4]), 4)
    with pytest.raises(TypeError):
        codebook_stats(torch.tensor([0.0, 1.0]), 4)


def test_nearest_l2_and_cosine():
    vq = _vq([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]]).eval()
    out = vq(torch.tensor([[0.9, 0.1], [0.1, 0.2], [0.2, 0.8]]))
    assert out.ids.tolist() == [1, 0, 2]
    assert torch.equal(out.quantized, torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 1.0]]))
    cos = _vq([[2.0, 0.0], [0.0, 3.0]], distance="cosine").eval()
    out = cos(torch.tensor([[10.0, 1.0], [-1.0, 5.0]]))
    assert out.ids.tolist() == [0, 1]
    # cosine codes are unit vectors, whatever the stored norm
    assert torch.allclose(out.quantized, torch.tensor([[1.0, 0.0], [0.0, 1.0]]))


def test_straight_through_gradient_is_identity():
    vq = _vq([[0.0, 0.0], [1.0, 0.0]]).eval()
    z = torch.tensor([[0.2, 0.1], [0.7, -0.3]], requires_grad=True)
    w = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    (vq(z).quantized * w).sum().backward()
    assert torch.equal(z.grad, w)


@pytest.mark.parametrize("legacy, book_grad", [(True, -0.05), (False, -0.2)])
def test_seed_legacy_weighting(legacy, book_grad):
    # z = (0.2, 0) -> code 0 = (0, 0). Both squared terms equal mean((0.2, 0)^2) = 0.02, so loss = 1.25 * 0.02.
    # The codebook gradient tells the weights apart: d/dc00 of w_book * ((c00 - 0.2)^2 + c01^2) / 2
    # = w_book * (c00 - 0.2) = -0.2 * w_book, with w_book = beta = 0.25 (legacy, SEED) or 1 (VQ-VAE).
    vq = _vq([[0.0, 0.0], [1.0, 0.0]], legacy=legacy).eval()
    z = torch.tensor([[0.2, 0.0]], requires_grad=True)
    out = vq(z)
    assert out.loss.item() == pytest.approx(0.025)
    out.loss.backward()
    assert vq.codebook.grad[0, 0].item() == pytest.approx(book_grad)
    # commitment: d/dz0 of w_commit * z0^2 / 2 = w_commit * 0.2, w_commit = 1 (legacy) or beta
    assert z.grad[0, 0].item() == pytest.approx(0.2 if legacy else 0.05)


def test_ema_update_hand_values():
    vq = _vq([[0.0, 0.0], [10.0, 10.0]], ema_decay=0.5).train()
    out = vq(torch.tensor([[1.0, 1.0], [3.0, 3.0]]))
    assert out.ids.tolist() == [0, 0]
    # count0 = 0.5*1 + 0.5*2 = 1.5, sum0 = 0.5*(0,0) + 0.5*(4,4) = (2,2) -> code0 = (4/3, 4/3)
    # count1 = 0.5, sum1 = 0.5*(10,10) -> code1 stays (10, 10)
    assert torch.allclose(vq.codebook, torch.tensor([[4 / 3, 4 / 3], [10.0, 10.0]]), atol=1e-4)
    assert not vq.codebook.requires_grad
    # EMA: no codebook term, only beta * commitment = 0.25 * mean(((1,1),(3,3)) - 0)^2 = 0.25 * 5
    assert out.loss.item() == pytest.approx(1.25)


def test_dead_code_restart():
    torch.manual_seed(0)
    vq = _vq([[0.0, 0.0], [100.0, 100.0]], dead_code_threshold=0.5, usage_decay=0.5).train()
    batch = torch.tensor([[0.1, 0.0], [0.0, 0.1]])
    vq(batch)  # code 1 unused: usage 1.5 -> 0.75, still alive
    assert vq.codebook[1].tolist() == [100.0, 100.0]
    vq(batch)  # 0.75 -> 0.375 < 0.5: restarted from a batch vector
    assert any(torch.equal(vq.codebook[1].detach(), row) for row in batch)


def test_kmeans_init_on_first_training_batch():
    torch.manual_seed(0)
    x = torch.tensor([[5.0, 5.0], [5.2, 5.0], [-5.0, -5.0], [-5.2, -5.0]])
    vq = VectorQuantizer(VQConfig(codebook_size=2, dim=2, kmeans_init=True)).train()
    vq(x)
    want = torch.tensor([[-5.1, -5.0], [5.1, 5.0]])
    got = vq.codebook.detach()
    assert torch.allclose(got[got[:, 0].argsort()], want)
    centres = kmeans(x, 2, iters=10)
    assert torch.allclose(centres[centres[:, 0].argsort()], want)


def test_original_and_improved_presets():
    orig = VQConfig.original(64, 8)
    assert (orig.distance, orig.ema_decay, orig.kmeans_init, orig.beta, orig.legacy) == ("l2", None, False, 0.25, True)
    vq = VectorQuantizer(orig)
    assert vq.codebook.abs().max().item() <= 1 / 64  # uniform(-1/K, 1/K), as taming/SEED
    imp = VQConfig.improved(64, 8)
    assert imp.distance == "cosine" and imp.ema_decay and imp.kmeans_init and imp.dead_code_threshold > 0


@pytest.mark.parametrize("field, value", [("distance", "l1"), ("codebook_size", 1), ("ema_decay", 1.5),
                                          ("beta", -1.0), ("dim", 0)])
def test_config_validation_names_field(field, value):
    with pytest.raises(ValueError, match=field):
        VQConfig(**{field: value})


def test_bad_inputs():
    vq = VectorQuantizer(VQConfig(codebook_size=4, dim=3))
    with pytest.raises(ValueError, match="last dimension"):
        vq(torch.zeros(2, 4))
    with pytest.raises(ValueError, match="lie in"):
        vq.lookup(torch.tensor([4]))
    with pytest.raises(TypeError):
        vq.lookup(torch.tensor([1.0]))
