"""SEED on a tiny config: causal mask, shapes, gradients per stage, tokenizer protocol, save/load, metrics, data."""

import math

import pytest
import torch

from mmreduce.tokenizers_visual.metrics import recall_at_k
from mmreduce.tokenizers_visual.protocol import VisualTokenizer
from mmreduce.tokenizers_visual.seed.clip import clip_loss
from mmreduce.tokenizers_visual.seed.config import ClipConfig, QFormerConfig, SeedConfig, TokenizerHeadConfig
from mmreduce.tokenizers_visual.seed.data import CaptionVocab, ShapeSpec, _relation, make_pairs
from mmreduce.tokenizers_visual.seed.model import SeedModel
from mmreduce.tokenizers_visual.seed.qformer import CausalQFormer, causal_mask
from mmreduce.tokenizers_visual.seed.tokenizer import SeedTokenizer
from mmreduce.tokenizers_visual.vq import VQConfig


def tiny_config() -> SeedConfig:
    return SeedConfig(
        clip=ClipConfig(image_size=24, patch_size=8, width=16, depth=1, heads=2, text_width=16, text_depth=1,
                        text_heads=2, embed_dim=8),
        qformer=QFormerConfig(num_queries=4, width=16, depth=2, heads=2, proj_dim=8),
        vq=VQConfig(codebook_size=16, dim=4),
        heads=TokenizerHeadConfig(rec_depth=1, gen_depth=1, gen_token_dim=2),
    )


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return SeedModel(tiny_config())


def test_causal_mask_is_strict_upper_triangle():
    expected = torch.tensor([[False, True, True], [False, False, True], [False, False, False]])
    assert torch.equal(causal_mask(3), expected)


def test_qformer_query_i_ignores_later_queries():
    torch.manual_seed(0)
    qf = CausalQFormer(QFormerConfig(num_queries=5, width=16, depth=2, heads=2), kv_dim=12).eval()
    tokens = torch.randn(2, 7, 12)
    before = qf(tokens).detach().clone()
    with torch.no_grad():
        qf.queries[3] += torch.randn(16)  # perturb query 3 only (a constant would vanish in LayerNorm)
    after = qf(tokens)
    assert torch.allclose(before[:, :3], after[:, :3], atol=1e-6)  # queries 0..2 cannot see query 3
    assert not torch.allclose(before[:, 3:], after[:, 3:], atol=1e-4)  # 3 and 4 can


def test_clip_loss_hand_value():
    # Orthonormal pairs with scale e^0 = 1: logits = I, each row CE = -log(e / (e + 1)) = log(1 + e^-1).
    eye = torch.eye(2)
    assert clip_loss(eye, eye, torch.tensor(0.0)).item() == pytest.approx(math.log(1 + math.exp(-1)))
    with pytest.raises(ValueError, match="differ"):
        clip_loss(eye, torch.eye(3), torch.tensor(0.0))


def test_stage_shapes_and_gradients(tiny):
    pixels, caps = make_pairs(3, seed=0, size=24)
    ids = CaptionVocab().encode(caps)
    tiny.trainable("qformer")
    tiny.stage1_loss(pixels, ids).backward()
    assert tiny.qformer.queries.grad is not None and tiny.qformer.queries.grad.abs().sum() > 0
    assert all(p.grad is None for p in tiny.clip.parameters())  # CLIP frozen in stage 1
    tiny.zero_grad(set_to_none=True)
    tiny.trainable("tokenizer")
    out = tiny.stage2_loss(pixels)
    assert out.vq.ids.shape == (3, 4) and out.rec.shape == (3, 4, 16) and out.causal.shape == (3, 4, 16)
    out.loss.backward()
    assert tiny.encode_task_layer[0].weight.grad.abs().sum() > 0  # reaches the encoder through the STE
    assert all(p.grad is None for p in tiny.qformer.parameters())  # Q-Former frozen in stage 2
    with pytest.raises(ValueError, match="stage"):
        tiny.trainable("nope")


def test_tokenizer_protocol_and_roundtrip(tiny, tmp_path):
    tok = SeedTokenizer(tiny)
    assert isinstance(tok, VisualTokenizer)
    pixels, _ = make_pairs(2, seed=1, size=24)
    ids = tok.encode(pixels)
    assert ids.shape == (2, 4) and ids.dtype == torch.int64 and 0 <= ids.min() and ids.max() < 16
    assert tok.decode(ids).shape == (2, 4, 16) and tok.generation_embedding(ids).shape == (2, 8)
    # Checkpoints are float16: a model already rounded to float16 must come back with identical ids.
    with torch.no_grad():
        for p in tiny.parameters():
            p.copy_(p.half().float())
    tok.save(tmp_path / "ck")
    again = SeedTokenizer.load(tmp_path / "ck")
    assert torch.equal(again.encode(pixels), tok.encode(pixels))
    with pytest.raises(ValueError, match="ids must be"):
        tok.decode(ids[:, :3])
    with pytest.raises(ValueError, match="pixels must be"):
        tok.encode(torch.zeros(1, 3, 32, 32))
    with pytest.raises(FileNotFoundError):
        SeedTokenizer.load(tmp_path / "missing")


def test_recall_at_k_hand_values():
    sim = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.3, 0.8], [0.5, 0.4, 0.1]])
    # query 0 (key a): top-1 is gallery 0 (a) -> hit; query 1 (b): top-1 gallery 2 (c), top-2 adds 1 (b);
    # query 2 (a): top-1 gallery 0 (a) -> hit, although its own index is 2 (duplicate captions count).
    r = recall_at_k(sim, ["a", "b", "a"], ["a", "b", "c"], ks=(1, 2))
    assert r[1] == pytest.approx(2 / 3) and r[2] == pytest.approx(1.0)
    with pytest.raises(ValueError):
        recall_at_k(sim, ["a"], ["a", "b", "c"])


def test_generated_pairs_are_deterministic_and_captioned():
    a, ca = make_pairs(4, seed=3)
    b, cb = make_pairs(4, seed=3)
    c, _ = make_pairs(4, seed=4)
    assert torch.equal(a, b) and ca == cb and not torch.equal(a, c)
    assert a.shape == (4, 3, 32, 32) and 0 <= a.min() and a.max() <= 1
    assert all(len(cap.split()) in (9, 10) for cap in ca)  # "a S C X left of a S C Y" / "... above a ..."
    left = ShapeSpec("circle", "red", "small", (10.0, 5.0))
    right = ShapeSpec("square", "blue", "small", (12.0, 25.0))
    assert _relation(left, right) == "left of" and _relation(right, left) == "right of"
    top = ShapeSpec("circle", "red", "small", (3.0, 10.0))
    assert _relation(top, ShapeSpec("cross", "cyan", "large", (20.0, 12.0))) == "above"


def test_bad_inputs_named():
    with pytest.raises(ValueError, match="outside the vocabulary"):
        CaptionVocab().encode(["a small pink circle"])
    with pytest.raises(ValueError, match="num_queries"):
        QFormerConfig(num_queries=0)
    with pytest.raises(ValueError, match="divisible"):
        ClipConfig(image_size=30, patch_size=4)
    with pytest.raises(ValueError, match="size"):
        make_pairs(2, seed=0, size=16)
