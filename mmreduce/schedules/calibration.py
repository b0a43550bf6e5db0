"""A prefill-only calibration objective with reuse of the layers a search does not change.

The objective looks at the logits of the first answer token (the last prompt position): `agreement` counts how
often the reduced model's argmax equals the unreduced model's (label-free), `accuracy` how often it equals the
label. Answers of the bundled benchmarks are one token, so this is the answer itself.

Candidates of a per-layer search share every layer before the searched one: `Calibration.capture` runs those once
per batch and stops, `Calibration.resume` runs only the remaining layers for each candidate schedule.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Sequence

import torch

from mmreduce.adapters import get_adapter

from ..api import wrap
from ..methods.schedule import Schedule

__all__ = ["Calibration", "OBJECTIVES"]

OBJECTIVES = ("agreement", "accuracy")


class _StopForward(Exception):
    """Raised by the capture hook: the layers after the captured one are not needed."""


@dataclass
class _Captured:
    args: tuple
    kwargs: dict
    run: object
    query_index: torch.Tensor  # (B,) position of the last prompt token in the captured stream


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
    def capture(self, prefix_keep: Sequence[float], layer: int) -> list[_Captured]:
        """Runs layers < `layer` once per batch under `prefix_keep` (fractions for layers 0..layer-1)."""
        if len(prefix_keep) != layer:
            raise ValueError(f"prefix_keep must hold {layer} entries (layers 0..{layer - 1}), got {len(prefix_keep)}")
        flat = list(prefix_keep) + [prefix_keep[-1]] * (self.num_layers - layer)
        reduced = wrap(self.model, Schedule(keep=flat, unit="fraction"))
        target = self.adapter.decoder_layers()[layer]
        captured: list[_Captured] = []

        def grab(module, args, kwargs):
            run = reduced._reducer._run
            query = run.query_index() if run is not None else _last_valid(kwargs, args)
            captured.append(_Captured(args, dict(kwargs), _copy_run(run), query))
            raise _StopForward

        handle = target.register_forward_pre_hook(grab, with_kwargs=True, prepend=True)
        try:
            with torch.inference_mode():
                for batch in self.batches:
                    try:
                        self.model(**batch, use_cache=False, logits_to_keep=1)
                    except _StopForward:
                        pass
        finally:
            handle.remove()
            reduced.unwrap()
        return captured

    def resume(self, captured: list[_Captured], keep: Sequence[float], layer: int) -> float:
        """Objective of schedule `keep` (whose layers < `layer` equal the captured prefix), running layers >= layer."""
        start = time.perf_counter()
        reduced = wrap(self.model, Schedule(keep=list(keep), unit="fraction"))
        reducer = reduced._reducer
        layers = self.adapter.decoder_layers()
        logits = []
        try:
            with torch.inference_mode():
                for item in captured:
                    reducer._run = _copy_run(item.run)
                    reducer._phase = "prefill"
                    hidden = item.args[0] if item.args else item.kwargs["hidden_states"]
                    kwargs = {k: v for k, v in item.kwargs.items() if k != "hidden_states"}
                    for module in layers[layer:]:
                        hidden = module(hidden, *item.args[1:], **kwargs)
                    run = reducer._run
                    query = run.query_index() if run is not None else item.query_index
                    rows = torch.arange(hidden.shape[0], device=hidden.device)
                    logits.append(self.adapter.logits_from_hidden(hidden[rows, query]))  # (B, V)
        finally:
            reducer._run = None
            reduced.unwrap()
        self.evaluations += 1
        self.seconds += time.perf_counter() - start
        return self.score(logits)

    def _forward(self, batch: dict, schedule: Schedule | None) -> torch.Tensor:
        """(B, V) logits at the last prompt position."""
        if schedule is None:
            return self.model(**batch, use_cache=False, logits_to_keep=1).logits[:, -1]
        with wrap(self.model, schedule) as reduced:
            return reduced(**batch, use_cache=False, logits_to_keep=1).logits[:, -1]


def _copy_run(run):
    """A copy of the engine's prefill state whose containers can grow independently (tensors are never mutated)."""
    if run is None:
        return None
    return dataclasses.replace(run, counts=list(run.counts), kept_positions=dict(run.kept_positions),
                               groups=list(run.groups), pending=dict(run.pending), group_kwargs=dict(run.group_kwargs))


def _last_valid(kwargs: dict, args: tuple) -> torch.Tensor:
    hidden = args[0] if args else kwargs["hidden_states"]
    return torch.full((hidden.shape[0],), hidden.shape[1] - 1, device=hidden.device)
