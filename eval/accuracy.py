"""Greedy answer accuracy of a VLM on benchmark samples, and a masked random-drop reference.

    acc, preds = evaluate(model, processor, samples, batch_size=16)

`evaluate` runs `model.generate` (greedy, left padding), so a wrapped (reduced) model is measured the same way.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .benchmarks import Sample
from .tiny_models import prompt_for

__all__ = ["batch_inputs", "evaluate", "generate_answers", "is_correct", "normalize_answer"]


def normalize_answer(text: str, words: int = 1) -> str:
    """The first `words` words of a decoded answer, lower-cased, punctuation stripped, joined by one space
    ("" if nothing was generated)."""
    found = text.replace("</s>", " ").strip().split()[:max(1, words)]
    return " ".join(word.strip(".,:;!?").lower() for word in found)


def is_correct(prediction: str, answer: str) -> bool:
    """Whether a decoded `prediction` starts with `answer`, word by word (case and punctuation ignored)."""
    length = len(answer.split())
    return normalize_answer(prediction, length) == normalize_answer(answer, length)


def batch_inputs(processor, samples: Sequence[Sample]) -> dict:
    """The processor batch of `samples`: prompts in the checkpoint's own format, left-padded (B, T)."""
    prompts = [prompt_for(processor, s.question, num_images=len(s.images)) for s in samples]
    images = [img for s in samples for img in s.images]
    return processor(images=images, text=prompts, return_tensors="pt", padding=True)


@torch.inference_mode()
def generate_answers(model, processor, samples: Sequence[Sample], batch_size: int = 16,
                     max_new_tokens: int = 3, progress: bool = False) -> list[str]:
    """Greedy answers for `samples` (normalised, as many words as each sample's answer has), `batch_size` at a
    time, prompts left-padded."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens!r}")
    if getattr(processor, "tokenizer", None) is not None and processor.tokenizer.padding_side != "left":
        raise ValueError("processor.tokenizer.padding_side must be 'left' for batched generation")
    from tqdm.auto import tqdm

    answers: list[str] = []
    starts = range(0, len(samples), batch_size)
    for start in tqdm(starts, desc="eval", disable=not progress, leave=False):
        batch = samples[start:start + batch_size]
        inputs = batch_inputs(processor, batch)
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=processor.tokenizer.pad_token_id)
        new = out[:, inputs["input_ids"].shape[1]:]  # (B, new) generated ids only
        texts = processor.tokenizer.batch_decode(new, skip_special_tokens=True)
        answers += [normalize_answer(t, len(s.answer.split())) for t, s in zip(texts, batch)]
    return answers


def evaluate(model, processor, samples: Sequence[Sample], batch_size: int = 16, max_new_tokens: int = 3,
             progress: bool = False) -> tuple[float, list[str]]:
    """(accuracy in [0, 1], predicted answers) of greedy generation on `samples`."""
    if len(samples) == 0:
        raise ValueError("samples must not be empty")
    predictions = generate_answers(model, processor, samples, batch_size, max_new_tokens, progress)
    correct = sum(is_correct(p, s.answer) for p, s in zip(predictions, samples))
    return correct / len(samples), predictions
