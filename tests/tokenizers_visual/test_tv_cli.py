"""The `tokenizer` CLI on a tiny saved SEED checkpoint, and the shipped checkpoints' interface."""

import argparse
import json
from pathlib import Path

import pytest
import torch

from mmreduce.tokenizers_visual.cli import add_subparser, main
from mmreduce.tokenizers_visual.seed.config import ClipConfig, QFormerConfig, SeedConfig, TokenizerHeadConfig
from mmreduce.tokenizers_visual.seed.model import SeedModel
from mmreduce.tokenizers_visual.seed.tokenizer import SeedTokenizer
from mmreduce.tokenizers_visual.vq import VQConfig

SHIPPED = Path(__file__).resolve().parents[2] / "tokenizers_visual" / "checkpoints"


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    cfg = SeedConfig(clip=ClipConfig(image_size=24, patch_size=8, width=16, depth=1, heads=2, text_width=16,
                                     text_depth=1, text_heads=2, embed_dim=8),
                     qformer=QFormerConfig(num_queries=4, width=16, depth=1, heads=2, proj_dim=8),
                     vq=VQConfig(codebook_size=16, dim=4), heads=TokenizerHeadConfig(rec_depth=1, gen_token_dim=2))
    folder = tmp_path_factory.mktemp("seed")
    SeedTokenizer(SeedModel(cfg)).save(folder)
    return folder


def test_every_leaf_sets_func():
    parser = argparse.ArgumentParser()
    add_subparser(parser.add_subparsers(dest="command"))
    for argv in (["tokenizer", "train", "seed", "--out", "x"], ["tokenizer", "train", "tokenunify", "--out", "x"],
                 ["tokenizer", "encode", "--generate", "1"], ["tokenizer", "decode", "--ids", "1,2"],
                 ["tokenizer", "eval", "seed"], ["tokenizer", "eval", "tokenunify", "--what", "rollout"]):
        assert callable(parser.parse_args(argv).func)


def test_encode_then_decode(tiny_checkpoint, capsys):
    main(["tokenizer", "encode", "--checkpoint", str(tiny_checkpoint), "--generate", "2", "--threads", "1"])
    lines = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert len(lines) == 2 and all(len(line["ids"]) == 4 and max(line["ids"]) < 16 for line in lines)
    ids = ",".join(str(i) for i in lines[0]["ids"])
    main(["tokenizer", "decode", "--checkpoint", str(tiny_checkpoint), "--ids", ids, "--threads", "1"])
    out = json.loads(capsys.readouterr().out)
    assert out["causal_embeddings_shape"] == [1, 4, 16] and len(out["generation_embedding"]) == 8
    with pytest.raises(SystemExit):
        main(["tokenizer", "decode", "--checkpoint", str(tiny_checkpoint), "--ids", "1,x"])
    with pytest.raises(SystemExit):
        main(["tokenizer", "encode", "--checkpoint", "/no/such/folder", "--generate", "1"])


@pytest.mark.parametrize("name", ["seed-original", "seed-improved"])
def test_shipped_seed_checkpoint(name):
    if not (SHIPPED / name).is_dir():
        pytest.skip(f"{name} not shipped")
    tok = SeedTokenizer.load(SHIPPED / name)
    from mmreduce.tokenizers_visual.seed.data import make_pairs

    pixels, _ = make_pairs(2, seed=5)
    ids = tok.encode(pixels)
    assert ids.shape == (2, tok.num_tokens) and int(ids.max()) < tok.codebook_size
    assert tok.decode(ids).shape == (2, tok.num_tokens, tok.config.qformer.width)
