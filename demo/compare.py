"""Run the baseline and each method on one input and collect answers, token counts, FLOPs and latency.

Latency is measured after `warmup` untimed runs (the first call pays for allocations and lazy init) as the
median of `repeats` timed runs, with its interquartile range (the spread a user should expect). The baseline runs wrapped with `mmreduce.Baseline` (no drop stages, which the test
suite proves bit-identical to the stock model), so it reports the same stats as the methods.
"""

from __future__ import annotations

import statistics
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from mmreduce.adapters import get_adapter
from mmreduce.eval.tiny_models import prompt_for

import mmreduce

from .inputs import DemoInputError
from .methods import MethodChoice

__all__ = ["DEFAULT_REPEATS", "MethodResult", "prepare_inputs", "run_comparison", "vision_positions"]

#: Timed runs per method by default: 7 gives quartiles (the IQR shown) and a median that one slow run cannot move.
DEFAULT_REPEATS = 7
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
    total_iqr_ms: float = 0.0  # interquartile range of the timed totals (0 with fewer than 4 runs)
    prefill_iqr_ms: float = 0.0
    total_runs_ms: list[float] = field(default_factory=list)  # every timed total, in run order

    @property
    def spread(self) -> float:
        """IQR of the total over its median: how far one run's total may stray."""
        return self.total_iqr_ms / self.total_ms if self.total_ms else 0.0

    @property
    def flops_ratio(self) -> float:
        return self.prefill_flops / self.baseline_prefill_flops if self.baseline_prefill_flops else 1.0

    def to_dict(self) -> dict:
        data = asdict(self)
        data["kept_positions"] = {str(k): v for k, v in self.kept_positions.items()}
        data["flops_ratio"] = self.flops_ratio
        data["spread"] = self.spread
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


def _spread(values: list[float]) -> tuple[float, float]:
    """(median, interquartile range) of timed runs; IQR 0 for fewer than 4 runs (no quartiles to speak of)."""
    ordered = sorted(values)
    if len(ordered) < 4:
        return statistics.median(ordered), 0.0
    low, _, high = statistics.quantiles(ordered, n=4, method="inclusive")
    return statistics.median(ordered), high - low


def run_comparison(model, processor, inputs: dict, choices: list[MethodChoice], *, warmup: int = 1,
                   repeats: int = DEFAULT_REPEATS, max_new_tokens: int = 4,
                   progress: Callable[[float, str], None] | None = None) -> list[MethodResult]:
    """Every choice on the same inputs: answers from greedy decoding, stats from the timed runs.

    The timed runs are interleaved (run 1 of every method, then run 2, ...), so a slow spell of a shared machine
    lands on every method instead of on one. `progress(fraction, message)` is told what runs next.
    A method that refuses this input (a ValueError from its hooks, e.g. TCC on a model without crops) is reported
    as a DemoInputError naming it.
    """
    if warmup < 0 or repeats < 1:
        raise ValueError(f"need warmup >= 0 and repeats >= 1, got warmup={warmup}, repeats={repeats}")
    tokenizer = processor.tokenizer
    prompt_length = inputs["input_ids"].shape[1]
    total_steps = len(choices) * (warmup + repeats)
    done = 0

    def run(choice: MethodChoice, what: str):
        nonlocal done
        if progress is not None:
            progress(done / total_steps, f"{choice.label}: {what}")
        done += 1
        try:
            return _run_once(model, choice.method, inputs, max_new_tokens, tokenizer.pad_token_id)
        except ValueError as error:
            if choice.label == "baseline":
                raise
            raise DemoInputError(f"{choice.label}: {error}") from None

    with _MODEL_LOCK:
        # The answer comes from each method's first run: warm-up 1, or timed run 1 when there is no warm-up.
        first = [run(choice, f"warm-up 1/{warmup}" if warmup else f"timed run 1/{repeats}") for choice in choices]
        for index in range(1, warmup):
            for choice in choices:
                run(choice, f"warm-up {index + 1}/{warmup}")
        timed: list[list] = [[] if warmup else [once] for once in first]
        for repeat in range(len(timed[0]), repeats):
            for slot, choice in enumerate(choices):
                timed[slot].append(run(choice, f"timed run {repeat + 1}/{repeats}"))
    if progress is not None:
        progress(1.0, "drawing the results")
    results = []
    for choice, (out, _), runs in zip(choices, first, timed):
        stats = runs[-1][1]
        answer = tokenizer.decode(out[0, prompt_length:], skip_special_tokens=True).strip()
        samples = {name: [float(getattr(s, name) or 0.0) for _, s in runs]
                   for name in ("vision_ms", "prefill_ms", "decode_ms", "generate_ms")}
        per_token = [s.decode_ms_per_token for _, s in runs if s.decode_ms_per_token is not None]
        total, total_iqr = _spread(samples["generate_ms"])
        prefill, prefill_iqr = _spread(samples["prefill_ms"])
        results.append(MethodResult(
            label=choice.label,
            answer=answer,
            vision_tokens_per_layer=list(stats.vision_tokens_per_layer[0]),
            vision_positions=list(stats.vision_positions[0]) if stats.vision_positions else [],
            kept_positions={layer: list(kept[0]) for layer, kept in sorted(stats.kept_positions.items())},
            equivalent_vision_tokens=stats.equivalent_vision_tokens,
            prefill_flops=stats.prefill_flops,
            baseline_prefill_flops=stats.baseline_prefill_flops,
            vision_ms=statistics.median(samples["vision_ms"]),
            prefill_ms=prefill,
            decode_ms=statistics.median(samples["decode_ms"]),
            decode_ms_per_token=statistics.median(per_token) if per_token else None,
            total_ms=total,
            planned=choice.planned,
            runs=repeats,
            note=stats.note,
            method=choice.method.describe(),
            total_iqr_ms=total_iqr,
            prefill_iqr_ms=prefill_iqr,
            total_runs_ms=samples["generate_ms"],
        ))
    return results
