"""Tiny VLMs: tokenizer, processors, random-init builds, the shipped checkpoints (offline), accuracy helpers."""

from __future__ import annotations

import pytest
import torch

from mmreduce.eval.accuracy import evaluate, normalize_answer
from mmreduce.eval.benchmarks import load_benchmark
from mmreduce.eval.tiny_models import (
    CHECKPOINT_DIR,
    TINY_MODELS,
    TinyVLMConfig,
    build_tiny,
    build_tokenizer,
    format_prompt,
    load_tiny,
    resolve_checkpoint,
)

SHIPPED = ["tiny-llava-shapes", "tiny-llava-next-docs", "tiny-internvl-docs", "tiny-llava-video"]


def test_tokenizer_is_a_closed_word_vocabulary_with_left_padding():
    tok = build_tokenizer()
    ids = tok(format_prompt("what color is the circle ?"))["input_ids"]
    words = tok.convert_ids_to_tokens(ids)
    assert words == ["<s>", "USER", ":", "<image>", "what", "color", "is", "the", "circle", "?", "ASSISTANT", ":"]
    assert tok.convert_ids_to_tokens(tok("zebra")["input_ids"]) == ["<s>", "<unk>"]
    batch = tok(["red", "what color"], padding=True)["input_ids"]
    assert batch[0][0] == tok.pad_token_id and batch[1][0] == tok.bos_token_id
    assert tok.decode(tok("red</s>", add_special_tokens=False)["input_ids"], skip_special_tokens=True) == "red"


def test_processors_expand_the_image_token_like_the_architectures_count():
    shapes = TINY_MODELS["tiny-llava-shapes"]
    model, processor = build_tiny("tiny-llava-shapes")
    sample = load_benchmark("shapes", "test", 1, **shapes.benchmark_options)[0]
    inputs = processor(images=[sample.image], text=[format_prompt(sample.question)], return_tensors="pt")
    assert (inputs["input_ids"] == model.config.image_token_id).sum() == (128 // 8) ** 2 == 256
    assert inputs["pixel_values"].shape == (1, 3, 128, 128)

    docs = TINY_MODELS["tiny-llava-next-docs"]
    model, processor = build_tiny("tiny-llava-next-docs")
    sample = load_benchmark("docs", "test", 1, **docs.benchmark_options)[0]
    inputs = processor(images=[sample.image], text=[format_prompt(sample.question)], return_tensors="pt")
    # 128 x 128 page, 64 px crops, 16 px patches: base 4x4 + grid 8x8 + one newline per grid row.
    assert (inputs["input_ids"] == model.config.image_token_id).sum() == 16 + 64 + 8
    assert inputs["pixel_values"].shape == (1, 5, 3, 64, 64)  # base image + 2 x 2 crops


def test_recipe_validation():
    with pytest.raises(ValueError, match="arch"):
        TinyVLMConfig(name="x", arch="qwen")
    with pytest.raises(ValueError, match="patch_size"):
        TinyVLMConfig(name="x", image_size=100, patch_size=8)
    with pytest.raises(ValueError, match="grid_pinpoints"):
        TinyVLMConfig(name="x", arch="llava_next")
    with pytest.raises(ValueError, match="tiny model"):
        build_tiny("tiny-nope")
    with pytest.raises(ValueError, match="no tiny checkpoint"):
        resolve_checkpoint("tiny-nope")


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_checkpoint_is_small_and_loads_offline(name, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    path = CHECKPOINT_DIR / name
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    assert size <= 15 * 2**20, f"{name} is {size / 2**20:.1f} MiB"
    model, processor = load_tiny(name)
    assert next(model.parameters()).dtype == torch.float32
    assert model.config.text_config.num_hidden_layers == 8
    recipe = TINY_MODELS[name]
    samples = load_benchmark(recipe.benchmark, "test", 8, seed=0, **recipe.benchmark_options)
    accuracy, predictions = evaluate(model, processor, samples, batch_size=8)
    # A trained model answers with a word of the question type's closed answer set (a random one would not);
    # the accuracies themselves are measured by `tiny_quality` and recorded in TRAINING.md.
    assert all(p in s.choices for p, s in zip(predictions, samples)), predictions
    assert 0.0 <= accuracy <= 1.0


def test_normalize_answer():
    assert normalize_answer(" Red </s>") == "red"
    assert normalize_answer("") == ""
    assert normalize_answer("left, right") == "left"


def test_a_processor_saved_with_right_padding_loads_padding_left(tmp_path):
    """Batched generation continues every row from its last token, whatever side the saved processor pads on."""
    model, processor = build_tiny("tiny-llava-shapes", seed=0)
    processor.tokenizer.padding_side = "right"
    folder = tmp_path / "right-padded"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    _, loaded = load_tiny(folder)
    assert loaded.tokenizer.padding_side == "left"
