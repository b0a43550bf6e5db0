"""Run the baseline and each method on one input and collect answers, token counts, FLOPs and latency.

Latency is measured after `warmup` untimed runs (the first call pays for allocations and lazy init) as the
median of `repeats` timed runs. The baseline runs wrapped with `mmreduce.Baseline` (no drop stages, which the test
suite proves bit-identical to the stock model), so it reports the same stats as the methods.
"""

from __future__ import annotations

import statistics
import threading
from dataclasses import asdict, dataclass, field

import torch

import mmreduce
from mmreduce.adapters import get_adapter
from mmreduce.eval.tiny_models import prompt_for

from .methods import MethodChoice

__all__ = ["MethodResult", "prepare_inputs", "run_comparison", "vision_positions"]

# One model object serves every browser tab; wrap() allows a single wrap at a time.
_MODEL_LOCK = threading.Lock()


@dataclass
class MethodResult:
    """One column of the comparison (times in ms, FLOPs of the prefill)."""

    label: str
    answer: str
    vision_tokens_per_layer: list[int]
    vision_positions: list[int]
    kept_positions: dict[int, list[int]]
    equivalent_vision_tokens: float
    prefill_flops: float
    baseline_prefill_flops: float
    vision_ms: float
    prefill_ms: float
    decode_ms: float
    decode_ms_per_token: float | None
    total_ms: float
    planned: list[int] | None = None
    runs: int = 0
    note: str = ""
    method: str = field(default="baseline")

    @property
    def flops_ratio(self) -> float:
        return self.prefill_flops / self.baseline_prefill_flops if self.baseline_prefill_flops else 1.0

    def to_dict(self) -> dict:
        data = asdict(self)
        data["kept_positions"] = {str(k): v for k, v in self.kept_positions.items()}
        data["flops_ratio"] = self.flops_ratio
        return data


def prepare_inputs(processor, images, question: str) -> dict:
    """Processor outputs for one prompt holding every image (video frames count as images).

    When the image processor cuts tiles from each image's original size (`crop_to_patches`, InternVL) and does not
    report that size, `image_sizes` (N, 2) (height, width) is added: the token layout needs it to know the tile grid
    (the model accepts and ignores it).
    """
    prompt = prompt_for(processor, question, num_images=len(images))
    inputs = dict(processor(images=list(images), text=[prompt], return_tensors="pt", padding=True))
    image_processor = getattr(processor, "image_processor", None)
    if "image_sizes" not in inputs and getattr(image_processor, "crop_to_patches", False):
        inputs["image_sizes"] = torch.tensor([[image.height, image.width] for image in images], dtype=torch.long)
    return inputs


def vision_positions(model, inputs: dict) -> list[int]:
    """Indices into `input_ids` of the vision tokens, in order (what `kept_positions` refers to)."""
    vision = get_adapter(model).vision_mask(input_ids=inputs["input_ids"][:1])  # (1, T)
    return vision[0].nonzero().flatten().tolist()


def _run_once(model, method, inputs, max_new_tokens: int, pad_token_id):
    target = mmreduce.wrap(model, method)
    try:
        with torch.inference_mode():
            out = target.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_token_id)
        return out, target.stats
    finally:
        target.unwrap()


def run_comparison(model, processor, inputs: dict, choices: list[MethodChoice], *, warmup: int = 1,
                   repeats: int = 2, max_new_tokens: int = 4) -> list[MethodResult]:
    """Every choice on the same inputs: answers from greedy decoding, stats from the timed runs."""
    if warmup < 0 or repeats < 1:
        raise ValueError(f"need warmup >= 0 and repeats >= 1, got warmup={warmup}, repeats={repeats}")
    tokenizer = processor.tokenizer
    prompt_length = inputs["input_ids"].shape[1]
    results = []
    with _MODEL_LOCK:
        for choice in choices:
            for _ in range(warmup):
                _run_once(model, choice.method, inputs, max_new_tokens, tokenizer.pad_token_id)
            runs = [_run_once(model, choice.method, inputs, max_new_tokens, tokenizer.pad_token_id)
                    for _ in range(repeats)]
            out, stats = runs[-1]
            answer = tokenizer.decode(out[0, prompt_length:], skip_special_tokens=True).strip()

            def median(name: str) -> float:
                return statistics.median(float(getattr(s, name) or 0.0) for _, s in runs)

            per_token = [s.decode_ms_per_token for _, s in runs if s.decode_ms_per_token is not None]
            results.append(MethodResult(
                label=choice.label,
                answer=answer,
                vision_tokens_per_layer=list(stats.vision_tokens_per_layer[0]),
                vision_positions=list(stats.vision_positions[0]) if stats.vision_positions else [],
                kept_positions={layer: list(kept[0]) for layer, kept in sorted(stats.kept_positions.items())},
                equivalent_vision_tokens=stats.equivalent_vision_tokens,
                prefill_flops=stats.prefill_flops,
                baseline_prefill_flops=stats.baseline_prefill_flops,
                vision_ms=median("vision_ms"),
                prefill_ms=median("prefill_ms"),
                decode_ms=median("decode_ms"),
                decode_ms_per_token=statistics.median(per_token) if per_token else None,
                total_ms=median("generate_ms"),
                planned=choice.planned,
                runs=repeats,
                note=stats.note,
                method=choice.method.describe(),
            ))
    return results
