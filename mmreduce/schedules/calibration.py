"""A prefill-only calibration objective with reuse of the layers a search does not change.

The objective looks at the logits of the first answer token (the last prompt position): `agreement` counts how
often the reduced model's argmax equals the unreduced model's (label-free), `accuracy` how often it equals the
label. Answers of the bundled benchmarks are one token, so this is the answer itself.

Candidates of a per-layer search share every layer before the searched one: `Calibration.capture` runs those once
per batch and stops, `Calibration.resume` runs only the remaining layers for each candidate schedule (through the
engine's public `mmreduce.capture_prefix` / `mmreduce.resume_prefix`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Sequence

import torch

from mmreduce.adapters import get_adapter

from ..api import LayerPrefix, capture_prefix, resume_prefix, wrap
from ..methods.schedule import Schedule

__all__ = ["Calibration", "OBJECTIVES"]

OBJECTIVES = ("agreement", "accuracy")


@dataclass
class Calibration:
    """Calibration batches of one model, and the unreduced reference.

    Args:
        model: a supported VLM.
        batches: processor outputs (dicts of tensors), prompts left-padded.
        labels: per batch, (B,) token ids of the correct first answer token (needed for objective="accuracy").
        objective: "agreement" or "accuracy".
    """

    model: torch.nn.Module
    batches: Sequence[dict]
    labels: Sequence[torch.Tensor] | None = None
    objective: str = "agreement"
    evaluations: int = field(default=0, init=False)
    seconds: float = field(default=0.0, init=False)

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise ValueError(f"Calibration.objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if not self.batches:
            raise ValueError("Calibration.batches must not be empty")
        if self.objective == "accuracy" and (self.labels is None or len(self.labels) != len(self.batches)):
            raise ValueError("objective='accuracy' needs one label tensor per batch")
        self.adapter = get_adapter(self.model)
        self.num_layers = len(self.adapter.decoder_layers())
        with torch.inference_mode():
            self.reference = [self._forward(batch, None) for batch in self.batches]
        self.reference_score = self.score(self.reference)

    # ---- objective ----------------------------------------------------------------------------------------------
    def score(self, logits: Sequence[torch.Tensor]) -> float:
        """Mean agreement with the unreduced argmax, or accuracy against the labels, over all samples."""
        hits = total = 0
        for index, batch_logits in enumerate(logits):
            predicted = batch_logits.argmax(dim=-1)
            target = self.labels[index] if self.objective == "accuracy" else self.reference[index].argmax(dim=-1)
            hits += int((predicted == target.to(predicted.device)).sum())
            total += predicted.numel()
        return hits / total

    def evaluate(self, keep: Sequence[float]) -> float:
        """Objective of a whole fractional schedule (one full forward per batch)."""
        start = time.perf_counter()
        schedule = Schedule(keep=list(keep), unit="fraction")
        with torch.inference_mode():
            result = self.score([self._forward(batch, schedule) for batch in self.batches])
        self.evaluations += 1
        self.seconds += time.perf_counter() - start
        return result

    # ---- prefix reuse -------------------------------------------------------------------------------------------
    def capture(self, prefix_keep: Sequence[float], layer: int) -> list[LayerPrefix]:
        """Runs layers < `layer` once per batch under `prefix_keep` (fractions for layers 0..layer-1)."""
        if len(prefix_keep) != layer:
            raise ValueError(f"prefix_keep must hold {layer} entries (layers 0..{layer - 1}), got {len(prefix_keep)}")
        flat = Schedule(keep=list(prefix_keep) + [prefix_keep[-1]] * (self.num_layers - layer), unit="fraction")
        return [capture_prefix(self.model, flat, batch, layer) for batch in self.batches]

    def resume(self, captured: list[LayerPrefix], keep: Sequence[float], layer: int) -> float:
        """Objective of schedule `keep` (whose layers < `layer` equal the captured prefix), running layers >= layer."""
        start = time.perf_counter()
        schedule = Schedule(keep=list(keep), unit="fraction")
        logits = [self.adapter.logits_from_hidden(resume_prefix(self.model, schedule, prefix))  # (B, V)
                  for prefix in captured]
        self.evaluations += 1
        self.seconds += time.perf_counter() - start
        return self.score(logits)

    def _forward(self, batch: dict, schedule: Schedule | None) -> torch.Tensor:
        """(B, V) logits at the last prompt position."""
        if schedule is None:
            return self.model(**batch, use_cache=False, logits_to_keep=1).logits[:, -1]
        with wrap(self.model, schedule) as reduced:
            return reduced(**batch, use_cache=False, logits_to_keep=1).logits[:, -1]
