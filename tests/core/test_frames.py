"""`frames` (uniform frame sampling): a clip sent as several images keeps evenly spaced whole frames, and computes
what the stock model computes when it is simply sent those frames."""

from __future__ import annotations

import pytest
import torch

import mmreduce
from tests.support.vlm_factory import IMAGE_TOKEN, llava_batch, tiny_llava

FRAMES = 4
TOKENS = 64


@pytest.fixture(scope="module")
def clip_model():
    return tiny_llava("sdpa", layers=4)


def _only_frames(batch: dict, frames: list[int]) -> dict:
    """The same prompts with only the given frames: their placeholders and pixels (left padding as before)."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    rows, masks = [], []
    for row in range(ids.shape[0]):
        first = int((ids[row] == IMAGE_TOKEN).nonzero()[0])
        drop = [first + f * TOKENS + t for f in range(FRAMES) if f not in frames for t in range(TOKENS)]
        keep = torch.ones(ids.shape[1], dtype=torch.bool)
        keep[drop] = False
        rows.append(ids[row][keep])
        masks.append(mask[row][keep])
    pixels = batch["pixel_values"].view(ids.shape[0], FRAMES, *batch["pixel_values"].shape[1:])[:, frames]
    return {"input_ids": torch.stack(rows), "attention_mask": torch.stack(masks), "pixel_values": pixels.flatten(0, 1)}


@pytest.mark.parametrize("keep_ratio, frames", [(0.5, [1, 3]), (0.25, [2]), (0.75, [0, 2, 3])])
def test_keeps_evenly_spaced_frames_and_equals_the_stock_model_sent_those_frames(clip_model, keep_ratio, frames):
    batch = llava_batch(images_per_sample=FRAMES, tokens_per_image=TOKENS)
    # evenly spaced = the middle of each of k equal runs of the F frames: floor((i + 0.5) * F / k)
    assert frames == [int((i + 0.5) * FRAMES / len(frames)) for i in range(len(frames))]
    with torch.no_grad(), mmreduce.wrap(clip_model, "frames", keep_ratio=keep_ratio, positions="packed") as reduced:
        logits = reduced(**batch).logits[:, -1]
        tokens = reduced.generate(**batch, max_new_tokens=3, do_sample=False)
        kept = reduced.stats.kept_positions[0]
    expected = _only_frames(batch, frames)
    with torch.no_grad():
        reference = clip_model(**expected).logits[:, -1]
        reference_tokens = clip_model.generate(**expected, max_new_tokens=3, do_sample=False)
    for row, positions in enumerate(kept):
        first = int((batch["input_ids"][row] == IMAGE_TOKEN).nonzero()[0])
        assert positions == [first + f * TOKENS + t for f in frames for t in range(TOKENS)]
    assert torch.allclose(logits, reference, atol=1e-5, rtol=0)
    assert torch.equal(tokens[:, batch["input_ids"].shape[1]:], reference_tokens[:, expected["input_ids"].shape[1]:])


def test_one_image_is_kept_whole_and_equivalent_budgets_are_refused(clip_model):
    batch = llava_batch()
    with torch.no_grad(), mmreduce.wrap(clip_model, "frames", keep_ratio=0.25) as reduced:
        reduced(**batch)
        assert not reduced.stats.reduced
    with pytest.raises(ValueError, match="equivalent= is not defined for frames"):
        mmreduce.parse_spec("frames:equivalent=0.5")
    with pytest.raises(ValueError, match="keep_ratio must be in"):
        mmreduce.create_method("frames", keep_ratio=0)
