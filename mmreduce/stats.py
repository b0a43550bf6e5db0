"""What one reduced forward or generate() did: tokens per layer, FLOPs, wall times."""

from __future__ import annotations

from dataclasses import dataclass, field

from .flops import ModelDims, prefill_flops

__all__ = ["ReductionStats"]


@dataclass
class ReductionStats:
    """Refreshed by every prefill; decode steps add to `decode_ms`/`decode_steps`.

    Attributes:
        method: the method spec (`name:field=value,...`).
        reduced: whether any vision token was dropped.
        note: why nothing was reduced, when that is the case.
        initial_vision_tokens: per sample, vision tokens in the prompt.
        text_tokens: per sample, non-padding non-vision prompt tokens.
        vision_tokens_per_layer: per sample, vision tokens entering each decoder layer.
        vision_positions: per sample, sorted indices of the prompt's vision tokens in the sequence the text model
            sees (the padded `input_ids`, or the prompt after placeholders were expanded for families that expand
            them before the LLM): what `kept_positions` index into.
        kept_positions: decoder layer where a drop takes effect -> per sample, sorted indices (as
            `vision_positions`) of the vision tokens entering that layer; layer 0 holds what a before-the-LLM method
            kept (a merged token sits where the first of its tokens was).
        extra_flops: per sample, what a before-the-LLM method spent choosing and merging (in `prefill_flops`).
        vision_ms / prefill_ms: wall time of the vision tower and of the LLM prefill.
        decode_ms / decode_steps: total LLM decode time and number of decode calls since the prefill.
        selection_ms: time spent scoring and selecting tokens (part of prefill_ms).
        generate_ms: wall time of the whole `ReducedModel.generate` call (None for forward calls).
    """

    method: str = ""
    reduced: bool = False
    note: str = ""
    num_layers: int = 0
    initial_vision_tokens: list[int] = field(default_factory=list)
    text_tokens: list[int] = field(default_factory=list)
    vision_tokens_per_layer: list[list[int]] = field(default_factory=list)
    vision_positions: list[list[int]] = field(default_factory=list)
    kept_positions: dict[int, list[list[int]]] = field(default_factory=dict)
    extra_flops: list[float] = field(default_factory=list)
    vision_ms: float = 0.0
    prefill_ms: float = 0.0
    decode_ms: float = 0.0
    decode_steps: int = 0
    selection_ms: float = 0.0
    generate_ms: float | None = None
    dims: ModelDims | None = field(default=None, repr=False)

    @property
    def equivalent_vision_tokens(self) -> float:
        """Vision tokens averaged over layers, then over samples (the papers' "N tokens" for in-LLM methods)."""
        per_sample = [sum(counts) / len(counts) for counts in self.vision_tokens_per_layer if counts]
        return sum(per_sample) / len(per_sample) if per_sample else 0.0

    @property
    def decode_ms_per_token(self) -> float | None:
        return self.decode_ms / self.decode_steps if self.decode_steps else None

    def tokens_per_layer(self, sample: int) -> list[int]:
        """Real (non-padding) tokens entering each layer for one sample."""
        return [self.text_tokens[sample] + n for n in self.vision_tokens_per_layer[sample]]

    def flops(self, convention: str = "exact") -> tuple[float, float]:
        """(reduced, baseline) prefill FLOPs summed over the batch, in the given convention
        ("exact": GQA-aware direct count, 2 FLOPs per multiply-add; "fastv" / "pdrop": the papers' formulas)."""
        if self.dims is None:
            return 0.0, 0.0
        reduced = baseline = 0.0
        for sample in range(len(self.vision_tokens_per_layer)):
            reduced += prefill_flops(self.tokens_per_layer(sample), self.dims, convention)
            reduced += self.extra_flops[sample] if sample < len(self.extra_flops) else 0.0
            full = self.text_tokens[sample] + self.initial_vision_tokens[sample]
            baseline += prefill_flops([full] * self.num_layers, self.dims, convention)
        return reduced, baseline

    @property
    def prefill_flops(self) -> float:
        return self.flops()[0]

    @property
    def baseline_prefill_flops(self) -> float:
        return self.flops()[1]

    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "reduced": self.reduced,
            "note": self.note,
            "initial_vision_tokens": self.initial_vision_tokens,
            "text_tokens": self.text_tokens,
            "vision_tokens_per_layer": self.vision_tokens_per_layer,
            "vision_positions": self.vision_positions,
            "kept_positions": {str(k): v for k, v in self.kept_positions.items()},
            "extra_flops": self.extra_flops,
            "equivalent_vision_tokens": self.equivalent_vision_tokens,
            "prefill_flops": self.prefill_flops,
            "baseline_prefill_flops": self.baseline_prefill_flops,
            "vision_ms": self.vision_ms,
            "prefill_ms": self.prefill_ms,
            "decode_ms": self.decode_ms,
            "decode_steps": self.decode_steps,
            "decode_ms_per_token": self.decode_ms_per_token,
            "selection_ms": self.selection_ms,
            "generate_ms": self.generate_ms,
        }
