"""Any per-layer schedule of kept vision tokens, ranked PyramidDrop-style wherever the count drops."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import torch

from .base import DropStage, ReductionMethod, register_method

__all__ = ["Schedule"]

_UNITS = ("count", "fraction")


@register_method("schedule")
@dataclass
class Schedule(ReductionMethod):
    """Vision tokens entering each decoder layer: `keep[l]` for layer l, non-increasing, layer 0 full.

    At every layer where the count drops, the surviving vision tokens are ranked by the attention of the last
    prompt token computed with that layer's own norm, q/k and RoPE (as PyramidDrop does), and the top ones kept.

    Parameters:
        keep: one entry per decoder layer; counts (unit "count", keep[0] = the image's vision tokens) or fractions of
            each sample's vision tokens (unit "fraction", keep[0] = 1.0).
        unit: "count" or "fraction"; None infers it (all integers with keep[0] > 1 -> count, else fraction).
        path: a JSON file written by `to_json` (or `mmreduce tune`) to load instead of `keep`.
        model: the model the schedule was made for (metadata; checked by tools that tune it).
        budget: the budget it was tuned for (metadata).
    """

    keep: tuple[float, ...] | None = None
    unit: str | None = None
    path: str | None = None
    model: str | None = None
    budget: Any = None

    def __post_init__(self):
        if self.path is not None:
            if self.keep is not None:
                raise ValueError("Schedule takes either keep or path, not both")
            loaded = _read_json(self.path)
            self.keep, self.unit = loaded["keep"], loaded.get("unit", self.unit)
            self.model = self.model if self.model is not None else loaded.get("model")
            self.budget = self.budget if self.budget is not None else loaded.get("budget")
        if self.keep is None:
            raise ValueError("Schedule.keep is required (or path= a schedule JSON)")
        if isinstance(self.keep, (str, bytes)) or not hasattr(self.keep, "__len__"):
            raise ValueError(f"Schedule.keep must be a sequence of numbers, got {self.keep!r}")
        keep = tuple(self.keep)
        if len(keep) < 2:
            raise ValueError(f"Schedule.keep needs one entry per decoder layer (>= 2), got {len(keep)}")
        for i, value in enumerate(keep):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or value < 0:
                raise ValueError(f"Schedule.keep[{i}] must be a number >= 0, got {value!r}")
        if self.unit is None:
            self.unit = "count" if all(isinstance(v, int) for v in keep) and keep[0] > 1 else "fraction"
        if self.unit not in _UNITS:
            raise ValueError(f"Schedule.unit must be one of {_UNITS}, got {self.unit!r}")
        if self.unit == "count":
            if not all(float(v).is_integer() for v in keep):
                raise ValueError(f"Schedule.keep must hold integers when unit='count', got {keep}")
            keep = tuple(int(v) for v in keep)
        else:
            keep = tuple(float(v) for v in keep)
            if keep[0] != 1.0 or max(keep) > 1.0:
                raise ValueError(f"fractional Schedule.keep must start at 1.0 (layer 0 full) and stay <= 1, got {keep}")
        for i in range(1, len(keep)):
            if keep[i] > keep[i - 1]:
                raise ValueError(
                    f"Schedule.keep must be non-increasing, but layer {i} keeps {keep[i]} > layer {i - 1}'s {keep[i - 1]}"
                )
        self.keep = keep

    @classmethod
    def example(cls, num_layers: int, keep_all: bool = False) -> "Schedule":
        """keep_all: 1.0 everywhere; otherwise 1, 1, then halving every two layers (6 layers: 1, 1, .5, .5, .25, .25)."""
        if keep_all:
            return cls(keep=[1.0] * num_layers)
        return cls(keep=[1.0 if layer < 2 else 0.5 ** ((layer - 2) // 2 + 1) for layer in range(num_layers)])

    def stages(self, num_layers: int) -> list[DropStage]:
        if len(self.keep) != num_layers:
            made_for = f" (made for {self.model})" if self.model else ""
            raise ValueError(
                f"Schedule has {len(self.keep)} entries{made_for} but the model has {num_layers} decoder layers; "
                "a schedule needs exactly one entry per layer"
            )
        field = "count" if self.unit == "count" else "fraction"
        return [
            DropStage(score_layer=layer, apply_layer=layer, **{field: self.keep[layer]})
            for layer in range(1, num_layers)
            if self.keep[layer] < self.keep[layer - 1]
        ]

    def check_inputs(self, initial_vision: torch.Tensor) -> None:
        if self.unit == "count":
            wrong = initial_vision != self.keep[0]
            # Samples without an image are left alone; any other size mismatch would silently shift the schedule.
            wrong &= initial_vision > 0
            if wrong.any():
                sample = int(wrong.nonzero()[0, 0])
                raise ValueError(
                    f"Schedule counts were made for {self.keep[0]} vision tokens, but sample {sample} has "
                    f"{int(initial_vision[sample])}; use unit='fraction' for inputs of other sizes"
                )

    def to_dict(self) -> dict:
        return {"keep": list(self.keep), "unit": self.unit, "num_layers": len(self.keep), "model": self.model,
                "budget": self.budget}

    def to_json(self, path: str | os.PathLike) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2)

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "Schedule":
        return cls(path=str(path))


def _read_json(path: str | os.PathLike) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"schedule file {str(path)!r} does not exist") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"schedule file {str(path)!r} is not valid JSON: {error}") from None
    if not isinstance(data, dict) or "keep" not in data:
        raise ValueError(f"schedule file {str(path)!r} must hold an object with a 'keep' list")
    if "num_layers" in data and data["num_layers"] != len(data["keep"]):
        raise ValueError(f"schedule file {str(path)!r}: num_layers={data['num_layers']} but keep has {len(data['keep'])}")
    return data
