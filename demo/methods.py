"""The methods a user picked in the UI -> validated method objects for one model, with short labels.

Every error names the method and the parameter, and is raised before any model runs, so a bad value never
costs a forward pass.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mmreduce

from .inputs import DemoInputError

__all__ = ["CONTROLLED_METHODS", "PLACEHOLDER_SPECS", "UI_METHODS", "MethodChoice", "build_methods", "parse_layers", "planned_counts"]

#: The methods with their own controls in the UI; every other registered method runs with its defaults when ticked
#: (and any parameters through the SPEC box).
CONTROLLED_METHODS = ("fastv", "pdrop", "random", "schedule")
#: Every registered method but the baseline (always shown): in-LLM ones, then before-the-LLM ones.
UI_METHODS = (*CONTROLLED_METHODS,
              *sorted(name for name in mmreduce.list_methods() if name not in (*CONTROLLED_METHODS, "baseline")))
#: What the SPEC box shows before anything is typed: a composed before-the-LLM + in-LLM method and a budget-fitted
#: one, both valid on every bundled model (8 layers).
PLACEHOLDER_SPECS = "visionzip:keep_ratio=0.5 then pdrop:layers=4\nfastv:layer=2,equivalent=0.5"
MAX_METHODS = 6  # each method costs warm-up + timed runs; more would make the UI wait too long on a CPU


@dataclass
class MethodChoice:
    """One column of the comparison (the first is always the baseline, `mmreduce.Baseline`)."""

    label: str
    method: mmreduce.ReductionMethod
    planned: list[int] | None = None  # vision tokens entering each layer, as the method plans them


def _whole(value: Any, what: str, minimum: int) -> int:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise DemoInputError(f"{what} must be a whole number, got {value!r}") from None
    if not math.isfinite(number) or not number.is_integer():
        raise DemoInputError(f"{what} must be a whole number, got {value!r}")
    if number < minimum:
        raise DemoInputError(f"{what} must be >= {minimum}, got {int(number)}")
    return int(number)


def _ratio(value: Any, what: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise DemoInputError(f"{what} must be a number in (0, 1], got {value!r}") from None
    if not (0 < number <= 1):
        raise DemoInputError(f"{what} must be in (0, 1], got {value!r}")
    return number


def parse_layers(text: str | None, what: str = "pdrop layers") -> tuple[int, ...] | None:
    """"2, 4, 6" (commas, spaces or '+') -> (2, 4, 6); empty -> None (the method's default)."""
    parts = [p for p in (text or "").replace("+", ",").replace(" ", ",").split(",") if p.strip()]
    if not parts:
        return None
    return tuple(_whole(p.strip(), what, 1) for p in parts)


def planned_counts(method: mmreduce.ReductionMethod, num_layers: int, vision_tokens: int) -> list[int]:
    """Vision tokens per layer the method plans for an input with `vision_tokens`."""
    return method.planned_counts(num_layers, vision_tokens)


def _schedule(path: str | os.PathLike | None) -> mmreduce.Schedule:
    if path is None or str(path).strip() == "":
        raise DemoInputError("schedule is selected but no schedule file was uploaded (a JSON from `mmreduce tune`)")
    try:
        return mmreduce.Schedule(path=str(path))
    except ValueError as error:
        raise DemoInputError(f"schedule file {Path(path).name!r}: {error}") from None


_PAPER_DEPTH = 32  # LLaVA-1.5-7B's decoder layers, the depth the methods' default layers are given for


def _scaled_defaults(name: str, num_layers: int) -> dict[str, int]:
    """Layer fields whose default is given for a 32-layer model, scaled to `num_layers` (AIM's start_layer 14 of
    32 would leave nothing to prune in an 8-layer model); every other field keeps its default."""
    import dataclasses

    kwargs = {}
    for spec in dataclasses.fields(mmreduce.method_class(name)):
        if spec.name in ("layer", "start_layer") and isinstance(spec.default, int) and spec.default >= num_layers - 1:
            kwargs[spec.name] = max(1, round(spec.default * num_layers / _PAPER_DEPTH))
    return kwargs


def build_methods(
    selected: list[str] | None,
    *,
    num_layers: int,
    vision_tokens: int,
    fastv_layer: Any = 2,
    fastv_keep: Any = 0.5,
    pdrop_layers: str | None = "",
    pdrop_keep: Any = 0.5,
    random_layer: Any = 2,
    random_keep: Any = 0.5,
    random_seed: Any = 0,
    schedule_file: str | os.PathLike | None = None,
    extra_specs: str | None = "",
) -> list[MethodChoice]:
    """Baseline first, then each selected method and each extra SPEC line (`mmreduce bench` syntax).

    Raises DemoInputError naming the method and parameter for anything out of range for this model.
    """
    selected = list(selected or [])
    unknown = [name for name in selected if name not in UI_METHODS]
    if unknown:
        raise DemoInputError(f"unknown method(s) {unknown}; choose from {list(UI_METHODS)}")
    wanted: list[tuple[str, Any]] = []  # (label, factory); factories run in `_checked` so errors get the label
    if "fastv" in selected:
        layer, keep = _whole(fastv_layer, "fastv layer", 1), _ratio(fastv_keep, "fastv keep ratio")
        wanted.append((f"fastv (layer {layer}, keep {keep:g})",
                       lambda layer=layer, keep=keep: mmreduce.FastV(layer=layer, keep_ratio=keep)))
    if "pdrop" in selected:
        layers, keep = parse_layers(pdrop_layers), _ratio(pdrop_keep, "pdrop keep ratio")
        where = "+".join(map(str, layers)) if layers else "default"
        wanted.append((f"pdrop (layers {where}, keep {keep:g})",
                       lambda layers=layers, keep=keep: mmreduce.PyramidDrop(layers=layers, keep_ratio=keep)))
    if "random" in selected:
        layer, keep = _whole(random_layer, "random layer", 1), _ratio(random_keep, "random keep ratio")
        seed = _whole(random_seed, "random seed", 0)
        wanted.append((f"random (layer {layer}, keep {keep:g}, seed {seed})",
                       lambda layer=layer, keep=keep, seed=seed: mmreduce.Random(layer=layer, keep_ratio=keep,
                                                                                 seed=seed)))
    if "schedule" in selected:
        schedule = _schedule(schedule_file)
        wanted.append((f"schedule ({Path(str(schedule_file)).name})", lambda schedule=schedule: schedule))
    for name in selected:
        if name not in CONTROLLED_METHODS:
            kwargs = _scaled_defaults(name, num_layers)
            shown = ", ".join(f"{key} {value}" for key, value in kwargs.items()) or "defaults"
            wanted.append((f"{name} ({shown})", lambda name=name, kwargs=kwargs: mmreduce.create_method(name, **kwargs)))
    for line in (extra_specs or "").splitlines():
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        try:
            spec = mmreduce.parse_spec(text)
        except (ValueError, TypeError) as error:
            raise DemoInputError(f"method spec {text!r}: {error}") from None
        if spec.name != "baseline":  # the baseline column is always shown
            wanted.append((text, lambda spec=spec: spec.build(num_layers, vision_tokens)))
    if len(wanted) > MAX_METHODS:
        raise DemoInputError(f"{len(wanted)} methods selected; the limit is {MAX_METHODS} per comparison")
    baseline = mmreduce.Baseline()
    choices = [MethodChoice("baseline", baseline, planned_counts(baseline, num_layers, vision_tokens))]
    for label, make in wanted:
        try:
            method = make()
            planned = planned_counts(method, num_layers, vision_tokens)
            method.check_inputs(_as_tensor(vision_tokens))
        except (ValueError, TypeError) as error:  # the method's own checks: field values, layers vs model depth
            raise DemoInputError(f"{label}: {error}") from None
        choices.append(MethodChoice(label, method, planned))
    return choices


def _as_tensor(vision_tokens: int):
    import torch

    return torch.tensor([vision_tokens])
