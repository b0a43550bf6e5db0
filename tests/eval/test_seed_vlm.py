"""SEED-VLM: prompt layout against the vocabulary arithmetic, offline save/load, the harness row, the CLI hook."""

from __future__ import annotations

import pytest
import torch

from mmreduce.eval.benchmarks import load_benchmark
from mmreduce.eval.harness import RESULT_FIELDS, BenchConfig, run_bench
from mmreduce.eval.seed_vlm import IMG_CLOSE, IMG_OPEN, MARKER, SeedVLM, SeedVLMConfig, is_seed_vlm
from mmreduce.eval.tiny_models import SPECIAL_TOKENS, VOCABULARY

TINY = SeedVLMConfig(hidden=32, layers=2, heads=2, kv_heads=1, intermediate=64)


@pytest.fixture(scope="module")
def vlm():
    return SeedVLM.build(TINY, seed=0)


@pytest.fixture(scope="module")
def saved(vlm, tmp_path_factory):
    return vlm.save(tmp_path_factory.mktemp("seed-vlm") / "tiny-seed")


def test_vocabulary_is_words_then_img_markers_then_codes(vlm):
    words = len(dict.fromkeys([*SPECIAL_TOKENS, *VOCABULARY]))  # the tiny LLaVA's ids stay a prefix
    assert vlm.tokenizer.convert_tokens_to_ids(IMG_OPEN) == words
    assert vlm.tokenizer.convert_tokens_to_ids(IMG_CLOSE) == words + 1
    assert vlm.offset == words + 2
    assert len(vlm.tokenizer) == words + 2 + 512 == vlm.lm.config.vocab_size


def test_prompt_holds_exactly_n_offset_ids_between_img_markers(vlm):
    ids = torch.tensor([[0, 5, 5, 511, 7, 7, 7, 100], [3, 3, 3, 3, 3, 3, 3, 3]])  # (2, 8) SEED ids
    inputs = vlm.prompts(["what color is the circle ?", "is there a red square ?"], ids)
    tok = vlm.tokenizer
    for row, codes in zip(inputs["input_ids"], ids):
        row = row[row != tok.pad_token_id]  # drop the left padding
        opens = (row == tok.convert_tokens_to_ids(IMG_OPEN)).nonzero().flatten()
        closes = (row == tok.convert_tokens_to_ids(IMG_CLOSE)).nonzero().flatten()
        assert len(opens) == len(closes) == 1
        block = row[opens[0] + 1:closes[0]]
        assert block.tolist() == (codes + vlm.offset).tolist()  # exactly N = 8 ids, each code + offset
        assert tok.convert_ids_to_tokens(row[:4].tolist()) == ["<s>", "USER", ":", IMG_OPEN]
        assert tok.convert_ids_to_tokens(row[-2:].tolist()) == ["ASSISTANT", ":"]


def test_training_rows_end_in_answer_and_eos(vlm):
    ids = torch.zeros(1, 8, dtype=torch.long)
    row = vlm.prompts(["what color is the circle ?"], ids, answers=["red"])["input_ids"][0]
    assert vlm.tokenizer.convert_ids_to_tokens(row[-4:].tolist()) == ["ASSISTANT", ":", "red", "</s>"]


def test_encode_images_resizes_benchmark_images_to_seed_ids(vlm):
    samples = load_benchmark("shapes", "test", 2, seed=0)
    ids = vlm.encode_images([s.image for s in samples])
    assert ids.shape == (2, 8) and ids.dtype == torch.long
    assert int(ids.min()) >= 0 and int(ids.max()) < 512


def test_save_load_round_trip_is_offline_and_identical(vlm, saved):
    assert (saved / MARKER).is_file() and is_seed_vlm(saved)
    loaded = SeedVLM.load(saved)
    ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])
    a, b = vlm.prompts(["how many red objects are there ?"], ids), loaded.prompts(["how many red objects are there ?"], ids)
    assert torch.equal(a["input_ids"], b["input_ids"])
    with torch.no_grad():
        assert torch.allclose(vlm.lm(**a).logits, loaded.lm(**b).logits, atol=1e-6)
    assert loaded.offset == vlm.offset and loaded.config == TINY


def test_harness_row_is_schema_complete_and_other_methods_are_skipped(saved, tmp_path):
    rows = run_bench(BenchConfig(model=str(saved), dataset="shapes", specs=["baseline", "fastv:keep_ratio=0.5"],
                                 samples=4, batch_size=2, out=str(tmp_path / "bench"), device="cpu", progress=False),
                     log=lambda message: None)
    base, fastv = rows
    assert set(RESULT_FIELDS) | {"predictions"} <= set(base)
    assert base["samples"] == 4 and len(base["predictions"]) == 4 and 0.0 <= base["accuracy"] <= 1.0
    assert base["vision_tokens"] == base["equivalent_vision_tokens"] == 8
    assert base["flops_ratio"] == 1.0 and base["prefill_flops"] > 0 and base["kv_cache_mb"] > 0
    assert fastv["note"].startswith("skipped:") and fastv["accuracy"] is None
    assert (tmp_path / "bench" / "results.json").is_file() and (tmp_path / "bench" / "results.md").is_file()


def test_prefill_flops_match_a_hand_count(saved, tmp_path):
    # One sample, prompt length n: per layer 2n·d·(d + 2·kv + d) + 4n²·d + 6n·d·m ("exact", MHA widths here)
    rows = run_bench(BenchConfig(model=str(saved), dataset="shapes", specs=["baseline"], samples=1, batch_size=1,
                                 out=str(tmp_path / "one"), device="cpu", progress=False), log=lambda message: None)
    vlm = SeedVLM.load(saved)
    sample = load_benchmark("shapes", "test", 1, seed=0)[0]
    n = int(vlm.prompts([sample.question], vlm.encode_images([sample.image]))["attention_mask"].sum())
    d, kv, m, layers = 32, 16, 64, 2  # kv width: 1 kv head of head_dim 16
    per_layer = 2 * n * d * d + 2 * 2 * n * d * kv + 2 * n * d * d + 4 * n * n * d + 6 * n * d * m
    assert rows[0]["prefill_flops"] == pytest.approx(layers * per_layer)


def test_config_validation():
    with pytest.raises(ValueError, match="heads"):
        SeedVLMConfig(hidden=30, heads=4)
    with pytest.raises(ValueError, match="resample"):
        SeedVLMConfig(resample="lanczos9")
